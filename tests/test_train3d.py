"""Training on a volume project's store (attrs ``dims: 3``, images (N, C, D, H, W)): a MONAI 3D
classifier and a 3D U-Net from scratch, random patches, 3D augmentation that moves masks with
their volumes, sliding-window validation, and model.pt rebuilding the 3D network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from haven.config import section_defaults
from haven.learn import checkpoint, net3d, train
from haven.learn.augment3d import augment_volumes
from haven.learn.data import ZarrSplit, normalize
from haven.learn.tasks import get_task

SIDE = 16
CFG = {"epochs": 4, "freeze_epochs": 1, "batch_size": 4, "lr": 3e-3, "threads": 1, "patience": 10,
       "label_smoothing": 0.0, "warmup_epochs": 0.2, "amp": "bf16"}  # bf16 asked for: CPU runs must ignore it


def _store(path, images, labels, classes, masks=None):
    """A volume store in the preprocess layout: one volume per chunk, dims 3, size [D, H, W]."""
    n, c = images.shape[:2]
    g = zarr.open_group(path, mode="w")
    g.create_array("images", data=images, chunks=(1,) + images.shape[1:])
    g.create_array("labels", data=labels.astype(np.int64), chunks=(n,))
    attrs = {"classes": classes, "mean": [0.2] * c, "std": [0.25] * c, "dims": 3, "spacing": [2.0, 2.0, 2.0],
             "size": list(images.shape[2:]), "channels": c, "mode": "mr", "targets": "labels"}
    if masks is not None:
        g.create_array("masks", data=masks, chunks=(1,) + masks.shape[1:])
        attrs["targets"] = "masks"
    g.attrs.update(attrs)
    return path


def _blob_volumes(n, seed):
    """Noise volumes with a bright 5^3 cube in the left (class 1) or right (class 0) half of D."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.integers(0, 60, (n, 1, SIDE, SIDE, SIDE)).astype(np.uint8)
    for i, k in enumerate(labels):
        d = int(rng.integers(1, 3)) if k else int(rng.integers(10, 11))
        h, w = rng.integers(2, SIDE - 7, 2)
        x[i, 0, d:d + 5, h:h + 5, w:w + 5] = 220
    return x, labels


def _lesion_volumes(n, seed, side=SIDE):
    """Noise volumes with a bright cube (its mask) somewhere, a fifth of them without one."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, 1, side, side, side)).astype(np.uint8)
    masks = np.zeros((n, side, side, side), np.uint8)
    for i in range(n):
        if i % 5 == 4:
            continue
        s = int(rng.integers(4, 7))
        d, h, w = rng.integers(1, side - s - 1, 3)
        x[i, 0, d:d + s, h:h + s, w:w + s] = 200
        masks[i, d:d + s, h:h + s, w:w + s] = 1
    return x, masks, (masks.reshape(n, -1) > 0).any(1)


@pytest.fixture(scope="module")
def cls_stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("vol")
    return (_store(d / "train.zarr", *_blob_volumes(24, 0), ["right", "left"]),
            _store(d / "val.zarr", *_blob_volumes(12, 1), ["right", "left"]))


def test_3d_classifier_learns_and_model_pt_rebuilds_it(cls_stores, tmp_path):
    train_store, val_store = cls_stores
    task = get_task("classification")
    model_cfg = {"backbone": "densenet_tiny", "weights": None}
    result = train.fit(train_store, val_store, model_cfg, CFG, tmp_path / "work", seed=0, task=task)
    # from scratch: the frozen-backbone phase is skipped in 3D (nothing pretrained to protect)
    assert [h["frozen"] for h in result.history] == [0] * CFG["epochs"]
    assert max(h["val_balanced_accuracy"] for h in result.history) >= 0.8, result.history  # chance: 0.5
    path = tmp_path / "model.pt"
    checkpoint.save_model(result, path, "densenet_tiny", train_store, train.hparams(CFG), task.name, task.options)
    model, meta = checkpoint.load_model(path)
    assert meta["dims"] == 3 and meta["size"] == [SIDE] * 3 and meta["spacing"] == [2.0, 2.0, 2.0]
    assert meta["patch"] is None  # a classifier sees whole volumes
    split = ZarrSplit(val_store)
    x, _ = next(split.batches(6, shuffle=False))
    x = normalize(x, split.mean, split.std)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))


def test_3d_network_names_and_weights_fail_clearly():
    with pytest.raises(ValueError, match="not a 3D classification network.*densenet121"):
        net3d.build_classifier3d("efficientnet_lite0", 2)
    with pytest.raises(ValueError, match="model.weights: null"):
        net3d.build_unet3d("unet_tiny", 2, weights="package:efficientnet_lite0")


def test_3d_augmentation_moves_masks_with_volumes_and_flips_left_right():
    _, masks, _ = _lesion_volumes(8, 3)
    masks = torch.from_numpy(masks).long()
    x = masks[:, None].float()  # a volume that is its own mask: whatever moves one must move the other
    aug = {**section_defaults("train", "augment"), "hflip": True, "rotate": 10, "scale": [0.9, 1.1],
           "translate": 0.05}
    out, moved = augment_volumes(x, masks, aug, 1.0, torch.Generator().manual_seed(0))
    assert moved.dtype == masks.dtype and set(moved.unique().tolist()) <= {0, 1} and not torch.equal(moved, masks)
    assert ((out[:, 0] > 0.5).long() == moved).float().mean() > 0.97  # nearest vs trilinear: the cube's edge
    again, _ = augment_volumes(x, masks, aug, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded
    # a flip alone mirrors the left-right axis (D, RAS x) and nothing else
    flip_only = {**section_defaults("train", "augment"), "hflip": True}
    v = torch.zeros(16, 1, 4, 4, 4)
    v[:, :, :2] = 1.0  # the left half bright
    flipped, _ = augment_volumes(v, None, flip_only, 1.0, torch.Generator().manual_seed(1))
    mirrored = torch.flip(v, dims=[2])
    per_sample = [torch.allclose(f, m, atol=1e-5) or torch.allclose(f, o, atol=1e-5)
                  for f, m, o in zip(flipped, mirrored, v)]
    assert all(per_sample) and 2 < sum(torch.allclose(f, m, atol=1e-5) for f, m in zip(flipped, mirrored)) < 14
    assert augment_volumes(v, None, flip_only, 0.0)[0] is v


def test_random_patches_cut_the_same_box_and_find_the_lesion():
    x, masks, _ = _lesion_volumes(10, 4, side=24)
    x, masks = torch.from_numpy(x), torch.from_numpy(masks)
    px, pm = net3d.random_patches(x, masks, [8, 8, 8], torch.Generator().manual_seed(0), pos_fraction=1.0)
    assert px.shape == (10, 1, 8, 8, 8) and pm.shape == (10, 8, 8, 8)
    assert torch.equal((px[:, 0] == 200).long(), pm.long())  # the image's cube is the mask's
    assert all(pm[i].any() for i in range(10) if masks[i].any())  # foreground-centred patches hold lesion


def test_3d_unet_learns_lesions_with_sliding_window_validation(tmp_path):
    d = tmp_path / "seg"
    x, m, lab = _lesion_volumes(20, 5)
    train_store = _store(d / "train.zarr", x, lab, ["background", "lesion"], m)
    x, m, lab = _lesion_volumes(10, 6)
    val_store = _store(d / "val.zarr", x, lab, ["background", "lesion"], m)
    task = get_task("segmentation", {"classes": ["background", "lesion"]})
    cfg = {**CFG, "epochs": 8, "lr": 1e-2, "patch": 8,
           "augment": {**section_defaults("train", "augment"), "hflip": True}}
    result = train.fit(train_store, val_store, {"backbone": "unet_tiny", "weights": None}, cfg, tmp_path / "w",
                       seed=0, task=task)
    dice = [h["val_dice"] for h in result.history]
    assert max(dice) > 0.5, dice  # an all-background predictor scores 0
    path = tmp_path / "model.pt"
    checkpoint.save_model(result, path, "unet_tiny", train_store, train.hparams(cfg), task.name, task.options)
    model, meta = checkpoint.load_model(path)
    assert meta["dims"] == 3 and meta["patch"] == [8, 8, 8]
    # the reloaded network gives the same sliding-window Dice as the trained one
    again = train.validate(model, ZarrSplit(val_store), task, "off", train.hparams(cfg))
    assert again["val_dice"] == pytest.approx(result.best_metric, abs=1e-6)


def test_amp_and_channels_last_are_for_the_gpu_and_fit_volumes():
    """AMP is asked for (bf16) but a CPU run computes in float32; the GPU's channels-last layout
    for volumes is NDHWC (channels_last_3d), which every 3D network's weights accept."""
    from haven.learn.infer import autocast

    net = net3d.build_classifier3d("densenet_tiny", 2)
    x = torch.randn(2, 1, SIDE, SIDE, SIDE)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        assert net.eval()(x).dtype == torch.float32
    assert train._memory_format(5) is torch.channels_last_3d and train._memory_format(4) is torch.channels_last
    for model in (net, net3d.build_unet3d("unet_tiny", 2)):
        model.to(memory_format=torch.channels_last_3d)  # raises for a weight of another rank
        with torch.no_grad():
            model.eval()(x.contiguous(memory_format=torch.channels_last_3d))
