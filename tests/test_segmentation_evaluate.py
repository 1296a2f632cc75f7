"""The segmentation task's evaluation (haven.trust.segmentation): known metric values for a
perfect and an all-background predictor, and the stage's body on tiny Zarr splits with masks,
writing metrics.json-able output and every declared figure as a real PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from haven.trust import segmentation as seg
from haven.trust.context import PLOT_KINDS, Context, Outputs, jsonable

CLASSES = ["background", "lesion"]
MEAN, STD = 0.3, 0.3


def settings(**kw) -> dict:
    from haven.config import section_defaults

    s = section_defaults("evaluate")
    s.update({"bootstrap": 50, "epsilons": [0, 0.5, 1.5], "pgd_steps": 3, "attack_samples": 8, "threads": 1, **kw})
    return s


def cases(n: int = 24, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (n, 1, size, size) of dark noise; every other one with an 8 x 8 square, bright (230)
    on site A, dim (100) on site B; their masks and sites."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, 1, size, size)).astype(np.uint8)
    y = np.zeros((n, size, size), np.uint8)
    site = np.array(["A" if (i // 2) % 2 == 0 else "B" for i in range(n)])
    for i in range(1, n, 2):
        r, c = rng.integers(2, size - 10, 2)
        y[i, r:r + 8, c:c + 8] = 1
        x[i, 0, r:r + 8, c:c + 8] = 230 if site[i] == "A" else 100
    return x, y, site


def one_hot(y: np.ndarray, k: int = 2) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[y].transpose(0, 3, 1, 2)


class Bright(nn.Module):
    """Lesion where the pixel is brighter than 150 of 255: perfect on site A, blind on site B."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        cut = (150 / 255 - MEAN) / STD
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 8.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -8.0 * cut]))

    def forward(self, x):
        return self.conv(x)


# ---------------------------------------------------------------------------------------------
# known values


def test_perfect_predictor_scores_one_and_hd95_zero():
    _, y, site = cases()
    m = seg.split_metrics(y, one_hot(y), CLASSES, np.repeat(np.arange(8), 3), settings(), 0, 10)
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["hd95"] == 0.0 and m["dice_present"] == 1.0
    assert m["per_class"]["lesion"]["dice"] == 1.0 and m["ci"]["dice"] == [1.0, 1.0]
    il = m["image_level"]
    assert il["roc_auc"] == 1.0 and il["sensitivity"] == 1.0 and il["specificity"] == 1.0
    assert m["all_background_dice"] == 0.5  # half the images show a lesion
    flat = seg.flat_metrics(m)
    assert flat["test_dice"] == flat["test_dice_lesion"] == flat["test_lesion_roc_auc"] == 1.0
    assert flat["test_hd95"] == 0.0 and "test_dice_ci_low" in flat and flat["test_dice_present"] == 1.0


def test_all_background_predictor_scores_zero_on_lesions():
    _, y, _ = cases()
    nothing = one_hot(np.zeros_like(y))
    m = seg.split_metrics(y, nothing, CLASSES, None, settings(bootstrap=0), 0, 10)
    assert m["dice_present"] == 0.0                       # every lesion missed
    assert m["dice"] == m["all_background_dice"] == 0.5   # clean negatives score 1: the chance line
    assert m["hd95"] is None and m["hd95_undefined"] == len(y)
    assert m["image_level"]["sensitivity"] == 0.0 and m["image_level"]["specificity"] == 1.0
    assert "ci" not in m  # bootstrap 0: no intervals claimed


def test_specks_below_threshold_pixels_are_not_called():
    _, y, _ = cases()
    speck = y.copy() * 0
    speck[::2, 0, :3] = 1  # 3 predicted pixels on every clean image
    probs = one_hot(np.maximum(y, speck))
    called = seg.split_metrics(y, probs, CLASSES, None, settings(bootstrap=0), 0, 10)["image_level"]
    assert called["specificity"] == 1.0
    strict = seg.split_metrics(y, probs, CLASSES, None, settings(bootstrap=0), 0, 1)["image_level"]
    assert strict["specificity"] == 0.0


def test_pixel_confusion_and_sample():
    _, y, _ = cases()
    cm = np.asarray(seg.pixel_confusion(y, one_hot(y)))
    assert cm[0, 1] == cm[1, 0] == 0 and cm[1, 1] == int((y == 1).sum()) and cm.sum() == y.size
    p, t = seg.pixel_sample(one_hot(y), y, 500, 0)
    assert p.shape == (500, 2) and (p.argmax(1) == t).all()


def test_bad_targets_say_what_to_rerun():
    class Split:
        store = "test.zarr"

    with pytest.raises(ValueError, match="test.zarr.*task: segmentation"):
        seg._check(np.zeros((4, 2)), np.zeros(4), CLASSES, Split())
    with pytest.raises(ValueError, match="different runs"):
        seg._check(np.zeros((4, 3, 8, 8)), np.zeros((4, 8, 8)), CLASSES, Split())


# ---------------------------------------------------------------------------------------------
# the stage's body on Zarr splits


def store(path, seed: int):
    import zarr
    from zarr.dtype import VariableLengthUTF8

    from haven.learn.data import ZarrSplit

    x, y, site = cases(seed=seed)
    n = len(y)
    g = zarr.open_group(path, mode="w")
    g.create_array("images", data=x, chunks=(8,) + x.shape[1:])
    g.create_array("masks", data=y, chunks=(8,) + y.shape[1:])
    g.create_array("labels", data=(y.reshape(n, -1) > 0).any(1).astype(np.int64), chunks=(n,))
    cols = {"patient": [f"p{i // 3}" for i in range(n)], "sex": ["F", "M"] * (n // 2), "site": site,
            "age_band": [""] * n}
    for col, values in cols.items():
        arr = g.create_array(col, shape=(n,), dtype=VariableLengthUTF8(), chunks=(n,))
        arr[:] = np.asarray(values, dtype=object)
    g.attrs.update({"classes": CLASSES, "size": 32, "channels": 1, "mode": "gray", "mean": [MEAN], "std": [STD],
                    "targets": "masks"})
    return ZarrSplit(path)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from haven.learn.tasks import get_task

    root = tmp_path_factory.mktemp("seg")
    test, val = store(root / "test.zarr", 0), store(root / "val.zarr", 1)
    out = root / "evaluate"
    out.mkdir()
    outputs = Outputs(metrics=out / "metrics.json", subgroups_table=out / "subgroups.csv",
                      predictions=out / "predictions.npz", explain_maps=out / "explain.npz",
                      plots={kind: out / f"{kind}.png" for kind in PLOT_KINDS})
    model = Bright().eval().requires_grad_(False)
    task = get_task("segmentation", {"classes": CLASSES, "threshold_pixels": 10})
    ctx = Context(model=model, meta={"classes": CLASSES, "task": "segmentation"}, task=task, test=test, val=val,
                  outputs=outputs, settings=settings(), seed=0, tta={"enabled": True, "hflip": True})
    return seg.evaluate(ctx), out


def test_stage_writes_every_figure_and_jsonable_metrics(evaluated):
    m, out = evaluated
    text = json.dumps(jsonable(m))
    assert "p0" not in text  # no patient identifier in metrics.json
    for kind in PLOT_KINDS:
        data = (out / f"{kind}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, kind
    assert (out / "subgroups.csv").read_text().startswith("attribute,group,metric,value")
    saved = np.load(out / "predictions.npz")
    assert {"masks", "truth", "dice", "iou", "hd95", "present", "score", "called"} <= set(saved.files)
    assert "probs" not in saved.files and saved["masks"].shape == (24, 32, 32) and saved["masks"].dtype == np.uint8
    maps = np.load(out / "explain.npz")
    assert maps["foreground_probability"].shape == (8, 32, 32)
    assert [t["title"] for t in m["tables"]] == ["Segmentation overlap (test split)", "Validation and test"]
    assert m["decision"]["text"] and m["tta_skipped"]


def test_stage_numbers_follow_the_model(evaluated):
    m, _ = evaluated
    # site A's bright lesions are all found, site B's dim ones all missed; clean images stay clean
    assert m["dice_present"] == pytest.approx(0.5) and m["dice"] == pytest.approx(0.75)
    assert m["image_level"]["sensitivity"] == 0.5 and m["image_level"]["specificity"] == 1.0
    assert m["val"]["dice"] == pytest.approx(0.75) and "cases" not in m["val"]
    assert m["ci"]["unit"] == "patient"
    sites = m["subgroups"]["attributes"]["site"]
    assert sites["groups"]["A"]["dice"] == 1.0 and sites["groups"]["B"]["dice"] == 0.5
    assert sites["flagged"] and m["subgroups"]["largest_gap"]["metric"] == "dice_present"
    assert m["subgroups"]["largest_gap"]["gap"] == 1.0 and "age_band" in m["subgroups"]["skipped"]
    # every lesion is on a man's image: mean Dice differs by prevalence, not skill, and is no gap
    sex = m["subgroups"]["attributes"]["sex"]
    assert sex["groups"]["F"]["dice"] == 1.0 and sex["groups"]["M"]["dice"] == 0.5 and not sex["flagged"]
    assert m["calibration"]["unit"] == "pixel" and m["calibration"]["temperature"] is not None


def test_attack_lowers_dice(evaluated):
    rob = evaluated[0]["robustness"]
    assert rob["n"] == 8 and rob["epsilons"] == [0.0, 0.5, 1.5]
    assert rob["fgsm"][0] == rob["pgd"][0] == rob["clean_dice"]   # eps 0: no attack
    assert rob["pgd"][2] < rob["clean_dice"] - 0.2                 # eps 1.5 crosses the brightness cut
    flat = seg.flat_metrics(jsonable(evaluated[0]))
    assert flat["test_pgd_dice_eps_1.5"] == rob["pgd"][2] and "test_subgroup_largest_gap" in flat
