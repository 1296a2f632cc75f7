"""The segmentation task through preprocess and training: masks stored beside their images with the
same crop, moved with them by augmentation, learned by a U-Net and carried by model.pt."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from haven.config import section_defaults
from haven.learn import checkpoint, data, preprocess, train
from haven.learn.tasks import get_task

CLASSES = ["background", "lesion"]
SIZE = 32


def _scene(rng, h=40, w=48):
    """A noisy photo with a bright square, and its mask (the square)."""
    img = rng.integers(0, 60, (h, w)).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    top, left, s = rng.integers(6, h - 16), rng.integers(10, w - 20), int(rng.integers(8, 12))
    img[top:top + s, left:left + s] = 220
    mask[top:top + s, left:left + s] = 1
    return img, mask


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """An anonymize stage's folder: 30 photos of 10 patients, 27 with a mask file beside them (0/255
    PNG), 3 without one (all background); the audit passed."""
    root = tmp_path_factory.mktemp("seg")
    (root / "data" / "0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for i in range(30):
        img, mask = _scene(rng)
        name = f"0/img{i:02d}.png"
        Image.fromarray(img).save(root / "data" / name)
        has_mask = i % 10 != 9
        if has_mask:
            Image.fromarray(mask * 255).save(root / "data" / f"0/img{i:02d}.mask.png")
        truth[name] = mask if has_mask else np.zeros_like(mask)
        rows.append({"file": name, "kind": "image", "patient": f"P{i % 10}", "study": "", "series": "", "label": "",
                     "sex": "", "age_band": "", "site": "", "modality": "", "role": "image",
                     "mask": f"0/img{i:02d}.mask.png" if has_mask else ""})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "audit.json").write_text(json.dumps({"passed": True}))
    out = root / "preprocess"
    stats = preprocess.preprocess(root, out, {"size": SIZE, "mode": "gray", "workers": 1, "chunk": 8,
                                              "split": {"val": 0.2, "test": 0.2}},
                                  seed=0, task="segmentation", task_options={"classes": CLASSES})
    return root, out, stats, truth


def test_masks_are_stored_with_the_images_crop_and_nearest_values(audited):
    root, out, stats, truth = audited
    import zarr

    split = pd.read_csv(out / "splits.csv")
    group = zarr.open_group(out / "train.zarr", mode="r")
    assert group.attrs["targets"] == "masks" and group.attrs["classes"] == CLASSES
    masks, images = np.asarray(group["masks"][:]), np.asarray(group["images"][:])
    assert masks.shape == (len(images), SIZE, SIZE) and set(np.unique(masks)) <= {0, 1}
    # the mask lies on the bright square: the same centre crop and resize as its image
    inside = images[:, 0][masks == 1].mean()
    outside = images[:, 0][masks == 0].mean()
    assert inside > 150 > 60 > outside
    train_rows = split[split["split"] == "train"].reset_index(drop=True)
    for i, name in enumerate(train_rows["file"]):
        expect = preprocess.np.asarray(Image.fromarray(truth[name][:, 4:44]).resize((SIZE, SIZE), Image.NEAREST))
        assert np.array_equal(masks[i], expect), name
    # labels: the image-level view, 0 for the images without a mask
    assert np.array_equal(np.asarray(group["labels"][:]), (masks.reshape(len(masks), -1) > 0).any(1).astype(int))
    assert (np.asarray(group["labels"][:]) == 0).any()
    assert stats["classes"] == CLASSES


def test_split_yields_masks_as_targets(audited):
    _, out, _, _ = audited
    split = data.ZarrSplit(out / "train.zarr")
    x, y = next(split.batches(4, shuffle=False))
    assert x.shape == (4, 1, SIZE, SIZE) and y.shape == (4, SIZE, SIZE) and y.dtype == torch.uint8
    two = data.ZarrSplit([out / "train.zarr", out / "val.zarr"])  # cross-validation reads folds as one split
    ys = torch.cat([y for _, y in two.batches(64, shuffle=False)])
    assert len(ys) == len(two) == len(split) + len(data.ZarrSplit(out / "val.zarr"))


def test_augmentation_moves_masks_with_their_images():
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(np.stack([_scene(rng, 32, 32)[1] for _ in range(16)])).long()
    x = masks[:, None].float()  # an image that is its own mask: whatever moves one must move the other
    aug = {"hflip": True, "vflip": True, "rotate": 25, "scale": [0.8, 1.2], "translate": 0.1,
           "brightness": 0.0, "contrast": 0.0}
    out, moved = data.augment_pair(x, masks, aug, 1.0, torch.Generator().manual_seed(0))
    assert moved.dtype == masks.dtype and set(moved.unique().tolist()) <= {0, 1}
    assert not torch.equal(moved, masks)  # it did move
    agree = ((out[:, 0] > 0.5).long() == moved).float().mean()
    assert agree > 0.97  # nearest vs bilinear differ only on the square's edge


def test_unet_learns_the_squares_and_model_pt_rebuilds_it(audited, tmp_path):
    _, out, _, _ = audited
    task = get_task("segmentation", {"classes": CLASSES})
    cfg = {"epochs": 6, "freeze_epochs": 0, "batch_size": 8, "lr": 1e-2, "threads": 1, "patience": 10,
           "augment": {**section_defaults("train", "augment"), "hflip": True}}
    result = train.fit(out / "train.zarr", out / "val.zarr", {"backbone": "test_resnet", "weights": None}, cfg,
                       tmp_path / "work", seed=0, task=task)
    dice = [h["val_dice"] for h in result.history]
    assert max(dice) > 0.5, dice  # a bright square is easy; chance (all background) scores 0
    path = tmp_path / "model.pt"
    checkpoint.save_model(result, path, "test_resnet", out / "train.zarr", train.hparams(cfg), task.name, task.options)
    model, meta = checkpoint.load_model(path)
    x, y = next(data.ZarrSplit(out / "val.zarr").batches(4, shuffle=False))
    split = data.ZarrSplit(out / "val.zarr")
    with torch.no_grad():
        a = result.model.eval()(data.normalize(x, split.mean, split.std))
        b = model(data.normalize(x, split.mean, split.std))
    assert meta["task"] == "segmentation" and b.shape == (4, 2, SIZE, SIZE)
    assert torch.allclose(a, b, atol=1e-5)
    rows = task.rows(task.scores(b).numpy(), {}, CLASSES)
    assert set(rows[0]) == set(task.prediction_columns(CLASSES))


def test_val_metrics_of_perfect_and_empty_predictions():
    task = get_task("segmentation", {"classes": CLASSES})
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[:2, 2:5, 2:5] = 1
    perfect = np.stack([1.0 - truth, truth.astype(float)], 1)
    empty = np.stack([np.ones_like(truth, float), np.zeros_like(truth, float)], 1)
    assert task.val_metrics(truth, perfect)["val_dice"] == pytest.approx(1.0)
    assert task.val_metrics(truth, empty)["val_dice"] == 0.0
    rows = task.rows(perfect, {}, CLASSES)
    assert [r["predicted"] for r in rows] == ["none"] * 4  # 9 pixels < threshold_pixels (10)
    rows = get_task("segmentation", {"classes": CLASSES, "threshold_pixels": 5}).rows(perfect, {}, CLASSES)
    assert [r["predicted"] for r in rows] == ["lesion", "lesion", "none", "none"]
    assert rows[0]["lesion_pixels"] == 9 and rows[0]["p_lesion"] == 1.0


def test_predict_writes_masks_at_the_files_own_size(audited, tmp_path):
    """The predict stage on audited photos: a row per image, and its mask as PNG and NIfTI at the
    photo's own 40 x 48 (the centre square predicted, the sides background)."""
    from haven.learn.preprocess import Inputs
    from haven.predict.bundle import Bundle
    from haven.predict.stage import predict
    from haven.sources.masks import read_mask

    root, out, _, truth = audited
    task = get_task("segmentation", {"classes": CLASSES})
    cfg = {"epochs": 4, "freeze_epochs": 0, "batch_size": 8, "lr": 1e-2, "threads": 1, "patience": 10}
    result = train.fit(out / "train.zarr", out / "val.zarr", {"backbone": "test_resnet", "weights": None}, cfg,
                       tmp_path / "work", seed=0, task=task)
    model_pt = tmp_path / "model.pt"
    checkpoint.save_model(result, model_pt, "test_resnet", out / "train.zarr", train.hparams(cfg), task.name, task.options)
    bundle = Bundle.load(model_pt)
    masks = tmp_path / "masks"
    summary = predict(Inputs(root / "manifest.csv", root / "audit.json", root / "data"), bundle,
                      tmp_path / "predictions.csv", tmp_path / "summary.json", masks=masks)
    table = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert summary["predicted"] == len(table) == 30  # the mask files are no samples
    first = table.iloc[0]
    files = first["mask_files"].split(";")
    assert files == ["0/img00.png", "0/img00.nii.gz"]
    png, nii = read_mask(masks / files[0]), read_mask(masks / files[1])
    assert png.shape == (40, 48) and np.array_equal(png, nii)
    assert (png[:, :4] == 0).all() and (png[:, 44:] == 0).all()  # outside the square the model saw
    assert first["lesion_pixels"] >= 0 and first["predicted"] in ("lesion", "none")


def test_masks_of_uid_named_files_do_not_collide(tmp_path):
    """A de-identified DICOM file is named by its UID (dots and all): its masks keep the whole name
    (a bug named every mask of a study 2.25.png)."""
    from haven.predict.masks import write_one

    (tmp_path / "data" / "0").mkdir(parents=True)
    names = ["0/2.25.11.png", "0/2.25.12.png"]
    for n in names:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data" / n)
    written = [write_one(np.ones((4, 4), np.uint8) * i, n, "image", tmp_path / "data", tmp_path / "out", CLASSES,
                         "m", "1") for i, n in enumerate(names)]
    assert written == [["0/2.25.11.png", "0/2.25.11.nii.gz"], ["0/2.25.12.png", "0/2.25.12.nii.gz"]]
