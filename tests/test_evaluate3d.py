"""The evaluate stage on a volume project (stores of 5-D images, model.pt ``dims: 3``): inference by
whole volumes or sliding windows, known metric values for perfect 3D predictors (HD95 in mm from
the store's spacing), the mid-slice figures, and a tiny trained 3D classifier and U-Net evaluated
end to end by :func:`haven.trust.evaluate.evaluate` with every declared figure written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from haven.config import section_defaults
from haven.learn import checkpoint, train
from haven.learn.data import ZarrSplit
from haven.learn.infer import predict
from haven.learn.tasks import get_task
from haven.trust import classify, segmentation
from haven.trust.context import PLOT_KINDS, Context, Outputs
from haven.trust.evaluate import evaluate
from haven.trust.segmetrics import case_metrics
from haven.trust.volume import CAPS, mid_slices
from test_train3d import CFG, SIDE, _blob_volumes, _lesion_volumes, _store

MEAN, STD = 0.2, 0.25  # the stores' statistics (test_train3d._store)
CUT = (150 / 255 - MEAN) / STD  # between the noise (< 60) and the bright cubes (200, 220), normalized
SEG = ["background", "lesion"]
SIDES = ["right", "left"]


def settings(**kw) -> dict:
    s = section_defaults("evaluate")
    s.update({"bootstrap": 50, "epsilons": [0, 0.5], "pgd_steps": 2, "attack_samples": 8, "threads": 1,
              "explain_per_class": 2, "ig_steps": 4, "randomization_samples": 2, **kw})
    return s


class Bright3D(nn.Module):
    """Lesion where the voxel is brighter than 150 of 255: a perfect segmenter of the lesion volumes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 8.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -8.0 * CUT]))

    def forward(self, x):
        return self.conv(x)


class Side3D(nn.Module):
    """'left' when the bright cube lies in the first half of D (RAS x), else 'right': a perfect
    classifier of the blob volumes, with a conv stage for Grad-CAM and a Linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 1, 1))
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)
            self.features[0].bias.fill_(-CUT)
            self.fc.weight.copy_(torch.tensor([[-4.0, 4.0], [4.0, -4.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        f = torch.relu(self.features(x))[:, 0]
        half = f.shape[1] // 2
        left, right = f[:, :half].amax((1, 2, 3)), f[:, half:].amax((1, 2, 3))
        return self.fc(torch.stack([left, right], 1))


def _outputs(d) -> Outputs:
    return Outputs(metrics=d / "metrics.json", subgroups_table=d / "subgroups.csv", predictions=d / "pred.npz",
                   explain_maps=d / "maps.npz", plots={k: d / f"{k}.png" for k in PLOT_KINDS})


def _assert_figures(out: Outputs) -> None:
    for kind, path in out.plots.items():
        assert path.read_bytes()[:4] == b"\x89PNG", kind


def _context(model, store, meta, out, task, **kw) -> Context:
    split = ZarrSplit(store)
    return Context(model=model.eval().requires_grad_(False), meta=meta, task=task, test=split, val=split,
                   outputs=out, settings=settings(), seed=0, **kw)


# ---------------------------------------------------------------------------------------------
# inference, metrics and slices


def test_predict_reads_volumes_whole_or_by_sliding_windows(tmp_path):
    x, m, lab = _lesion_volumes(6, 0)
    split = ZarrSplit(_store(tmp_path / "s.zarr", x, lab, SEG, m))
    task = get_task("segmentation", {"classes": SEG})
    whole, y = predict(Bright3D(), split, task, "bf16")
    windows, _ = predict(Bright3D(), split, task, "bf16", patch=[8, 8, 8])
    assert whole.shape == windows.shape == (6, 2, SIDE, SIDE, SIDE) and windows.dtype == np.float32
    assert y.shape == (6, SIDE, SIDE, SIDE)
    np.testing.assert_allclose(windows, whole, atol=1e-5)  # a voxel-wise model: the windows change nothing
    assert ((windows.argmax(1) == y).all())


def test_hd95_of_volumes_is_in_mm_along_each_axis():
    truth = np.zeros((2, 12, 12, 12), np.uint8)
    truth[:, 3:9, 3:9, 3:9] = 1
    pred = np.zeros_like(truth)
    pred[0, 4:10, 3:9, 3:9] = 1  # one voxel along D (RAS x)
    pred[1, 3:9, 3:9, 4:10] = 1  # one voxel along W (RAS z)
    voxels = case_metrics(truth, pred, SEG)["hd95"][:, 0]
    mm = case_metrics(truth, pred, SEG, spacing=(1.0, 1.0, 3.0))["hd95"][:, 0]
    assert voxels.tolist() == [1.0, 1.0] and mm.tolist() == [1.0, 3.0]


def test_mid_slices_orient_each_view_superior_or_anterior_up():
    v = np.zeros((4, 6, 8), np.uint8)  # D, H, W = RAS x, y, z
    v[2, 0, 7] = 1  # in the middle sagittal slice, most posterior (y 0) and superior (z 7)
    v[0, 3, 7] = 2  # in the middle coronal slice, most right... x 0, superior
    out = mid_slices(v, gap=2)
    assert out.shape == (8, 6 + 2 + 4 + 2 + 4)  # (z, y) | (z, x) | (y, x), padded to the tallest
    assert out[0, 0] == 1  # sagittal: superior row on top, y increasing to the right
    assert out[0, 8] == 2  # coronal: superior on top, x 0 in the first column
    assert mid_slices(np.zeros((3, 1, 4, 6, 8))).shape == (3, 1, 8, 18)  # batches and channels pass through


# ---------------------------------------------------------------------------------------------
# perfect predictors: known values, every figure


def test_perfect_3d_segmenter_scores_one_with_hd95_in_mm(tmp_path):
    x, m, lab = _lesion_volumes(10, 1)
    store = _store(tmp_path / "s.zarr", x, lab, SEG, m)
    out = _outputs(tmp_path / "out")
    (tmp_path / "out").mkdir()
    task = get_task("segmentation", {"classes": SEG})
    ctx = _context(Bright3D(), store, {"classes": SEG, "dims": 3, "patch": [8, 8, 8]}, out, task,
                   tta={"enabled": True, "hflip": True})
    metrics = segmentation.evaluate(ctx)
    assert metrics["dice"] == 1.0 and metrics["hd95"] == 0.0 and metrics["hd95_unit"] == "mm"
    assert metrics["image_level"]["roc_auc"] == 1.0 and metrics["all_background_dice"] == pytest.approx(0.2)
    assert metrics["robustness"]["clean_dice"] == 1.0 and metrics["robustness"]["n"] == CAPS["attack_samples"]
    assert metrics["volume_limits"]["attack_samples"] == {"asked": 8, "used": CAPS["attack_samples"]}
    assert "tta_skipped" in metrics and "HD95 (mm)" in metrics["tables"][0]["header"]
    assert metrics["calibration"]["pixels"] == min(segmentation.PIXEL_SAMPLE, 10 * SIDE ** 3)
    _assert_figures(out)  # the segmentation draws every kind, Grad-CAM and IG as panels saying why not
    saved = np.load(out.predictions)
    assert saved["masks"].shape == (10, SIDE, SIDE, SIDE)


def test_perfect_3d_classifier_scores_one_and_explains_on_mid_slices(tmp_path):
    x, lab = _blob_volumes(12, 2)
    store = _store(tmp_path / "c.zarr", x, lab, SIDES)
    out = _outputs(tmp_path / "out")
    (tmp_path / "out").mkdir()
    ctx = _context(Side3D(), store, {"classes": SIDES, "dims": 3, "patch": None}, out, get_task("classification"),
                   tta={"enabled": True, "hflip": True})
    metrics = classify.evaluate(ctx)
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc"] == 1.0 and metrics["ci"]["accuracy"] == [1.0, 1.0]
    assert "tta" not in metrics and "flip" in metrics["tta_skipped"]
    rob = metrics["robustness"]
    assert rob["clean_accuracy"] == 1.0 and rob["n"] == CAPS["attack_samples"] and "volume_note" in rob
    assert rob["fgsm"][0] == 1.0  # eps 0 changes nothing
    ex = metrics["explain"]
    assert len(ex["examples"]) == 2 and ex["ig_steps"] == 4  # one correct per class (capped), none wrong
    maps = np.load(out.explain_maps)
    assert maps["gradcam"].shape == maps["ig"].shape == (2, SIDE, SIDE, SIDE)
    # Grad-CAM finds the cube: its hottest voxel lies inside the bright one of that volume
    for i, g in zip(maps["index"], maps["gradcam"]):
        assert x[i, 0].flat[int(np.argmax(g))] == 220
    for kind in ("gradcam", "integrated_gradients", "confusion", "roc", "reliability", "robustness"):
        assert out.plots[kind].read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# trained models through the stage


def _seg_store(path, seed):
    x, masks, present = _lesion_volumes(10, seed)
    return _store(path, x, present, SEG, masks)


def _fit_and_save(tmp_path, stores, backbone, task, cfg) -> str:
    result = train.fit(stores[0], stores[1], {"backbone": backbone, "weights": None}, cfg, tmp_path / "w", seed=0,
                       task=task)
    path = tmp_path / "model.pt"
    checkpoint.save_model(result, path, backbone, stores[0], train.hparams(cfg), task.name, task.options)
    return path


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_trained_3d_models_evaluate_end_to_end(tmp_path, kind):
    d = tmp_path / "data"
    if kind == "classification":
        stores = [_store(d / f"{n}.zarr", *_blob_volumes(12, i), SIDES) for i, n in enumerate(("train", "val"))]
        task, backbone, cfg = get_task("classification"), "densenet_tiny", {**CFG, "epochs": 2}
    else:
        stores = [_seg_store(d / f"{n}.zarr", i) for i, n in enumerate(("train", "val"))]
        task, backbone = get_task("segmentation", {"classes": SEG}), "unet_tiny"
        cfg = {**CFG, "epochs": 2, "patch": 8}
    model_path = _fit_and_save(tmp_path, stores, backbone, task, cfg)
    out = _outputs(tmp_path / "eval")
    metrics = evaluate(model_path, stores[1], stores[0], out, settings(), task.name, task_options=task.options)
    assert json.loads(out.metrics.read_text()) == metrics
    _assert_figures(out)
    assert metrics["volume_limits"] and set(metrics["seconds"]) >= {"metrics", "calibration", "robustness"}
    if kind == "classification":
        assert 0 <= metrics["accuracy"] <= 1 and metrics["calibration"]["ece"] is not None
        assert len(metrics["robustness"]["fgsm"]) == 2 and metrics["explain"]["gradcam_layer"].startswith("features")
    else:
        assert 0 <= metrics["dice"] <= 1 and metrics["hd95_unit"] == "mm"
        assert np.load(out.predictions)["masks"].shape == (10, SIDE, SIDE, SIDE)
    # the ONNX export takes the volume grid (it assumed S x S and stopped on a list size: a brain-mri trial run)
    from haven.predict.onnx import export_and_check

    record = export_and_check(model_path, stores[1], tmp_path / "model.onnx")
    assert record["passed"] and record["n"] == len(ZarrSplit(stores[1])) and "D, H, W" in record["input"]
