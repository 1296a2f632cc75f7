"""Multi-label detection: labels, the positive-weighted BCE in the training loop, per-finding and
macro/micro metrics and the RSNA weighted log loss on known inputs, thresholds chosen on
validation, the patient bootstrap, the evaluate stage end to end and the prediction rows."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from sklearn.metrics import log_loss, roc_auc_score
from test_evaluate import FAST
from tinyproject import assert_every_figure, evaluate_all, save_model, train_briefly

from haven.config import section_defaults
from haven.learn.tasks import get_task
from haven.learn.tasks.multilabel import MAX_POS_WEIGHT, MultiLabel
from haven.trust import evaluate as ev
from haven.trust.decision import youden_threshold
from haven.trust.multilabel import calibrate_and_decide
from haven.trust.multilabel_metrics import (bootstrap_intervals, multilabel_metrics, scale_binary, sorted_auc,
                                            weighted_log_loss)

FINDINGS = ["left", "right", "any"]


# ---------------------------------------------------------------------------------------------
# labels
def test_findings_are_parsed_and_a_single_label_table_is_refused():
    task = get_task("multilabel", {})
    labels = pd.Series(["left=1;right=0;any=1", "left=0;right=0;any=0", "left=1;right=1;any=1"])
    assert task.classes(labels) == FINDINGS
    y = task.encode(labels, FINDINGS)
    assert y.dtype == np.float32 and y.tolist() == [[1, 0, 1], [0, 0, 0], [1, 1, 1]]
    assert task.counts(labels, FINDINGS) == {"left": 2, "right": 1, "any": 2, "n": 3}
    with pytest.raises(ValueError) as e:  # a single-label table given to a multilabel project
        task.classes(pd.Series(["hemorrhage", "normal"]))
    assert "'hemorrhage'" in str(e.value) and "label_column" in str(e.value) and "classification" in str(e.value)
    with pytest.raises(ValueError, match="same findings in the same order"):
        task.classes(pd.Series(["left=1;right=0", "right=0;left=1"]))
    with pytest.raises(ValueError, match="'right' is '2', not 0 or 1"):
        task.classes(pd.Series(["left=1;right=2"]))
    assert task.summary_label(FINDINGS) == "any"
    assert MultiLabel({"summary_label": "left"}).summary_label(FINDINGS) == "left"
    with pytest.raises(ValueError, match="multilabel.summary_label 'bleed'"):
        MultiLabel({"summary_label": "bleed"}).summary_label(FINDINGS)


def test_positive_weights_are_negatives_over_positives():
    task = MultiLabel()
    y = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    loss = task.loss(y, FINDINGS, {"balance": "loss", "label_smoothing": 0.0})
    # left: 2 negatives / 2 positives; right: 3 / 1; any has no positive: 1
    assert loss.pos_weight.tolist() == [1.0, 3.0, 1.0]
    rare = np.zeros((1000, 1), np.float32)
    rare[0] = 1
    assert task.loss(rare, ["x"], {"balance": "loss"}).pos_weight.tolist() == [MAX_POS_WEIGHT]
    assert task.loss(y, FINDINGS, {"balance": "none"}).pos_weight is None
    # the loss by hand: mean over cells of -(w y log s + (1 - y) log(1 - s))
    z = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2], [1.0, 1.0, 1.0], [-2.0, 0.7, 0.1]])
    s, w, t = torch.sigmoid(z), torch.tensor([1.0, 3.0, 1.0]), torch.from_numpy(y)
    by_hand = -(w * t * torch.log(s) + (1 - t) * torch.log(1 - s)).mean()
    assert float(loss(z, t)) == pytest.approx(float(by_hand), rel=1e-6)
    assert torch.allclose(task.scores(z), s) and torch.allclose(task.scores(task.logits(s, 3)), s, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# metrics on known inputs
def _targets(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < [0.3, 0.5]).astype(np.float32)
    y[:2, 0], y[2:4, 0] = 1, 0  # both classes of every finding
    return np.concatenate([y, y.max(1, keepdims=True)], 1)


def test_a_perfect_predictor_and_a_chance_predictor():
    y = _targets()
    m = multilabel_metrics(y, y.astype(np.float64), FINDINGS)
    assert m["macro_roc_auc"] == m["micro_roc_auc"] == m["roc_auc"] == 1.0
    assert all(v["roc_auc"] == 1.0 and v["pr_auc"] == 1.0 for v in m["labels"].values())
    assert m["weighted_log_loss"] == pytest.approx(0.0, abs=1e-12) and m["balanced_accuracy"] == 1.0
    # a constant predictor at each finding's prevalence: AUC 0.5 and the log loss of the prevalence
    prev = y.mean(0)
    m = multilabel_metrics(y, np.tile(prev, (len(y), 1)), FINDINGS)
    assert m["macro_roc_auc"] == pytest.approx(0.5) and all(v["roc_auc"] == 0.5 for v in m["labels"].values())
    h = -(prev * np.log(prev) + (1 - prev) * np.log(1 - prev))
    assert [v["log_loss"] for v in m["labels"].values()] == pytest.approx(h.tolist())
    assert m["weighted_log_loss"] == pytest.approx((h[0] + h[1] + 2 * h[2]) / 4)
    assert m["log_loss_weights"] == {"left": 1.0, "right": 1.0, "any": 2.0}


def test_weighted_log_loss_by_hand():
    y = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]])
    p = np.array([[0.8, 0.1, 0.9], [0.3, 0.2, 0.4], [0.5, 0.6, 0.7]])
    left = -(math.log(0.8) + math.log(0.7) + math.log(0.5)) / 3
    right = -(math.log(0.9) + math.log(0.8) + math.log(0.6)) / 3
    any_ = -(math.log(0.9) + math.log(0.6) + math.log(0.7)) / 3
    assert weighted_log_loss(y, p, FINDINGS) == pytest.approx((left + right + 2 * any_) / 4)
    assert left == pytest.approx(log_loss(y[:, 0], p[:, 0]))
    # the challenge's reading, each image's weighted row loss averaged, is the same number
    rows = [-(sum(w * (math.log(q) if t else math.log(1 - q)) for w, t, q in zip((1, 1, 2), yr, pr))) / 4
            for yr, pr in zip(y, p)]
    assert weighted_log_loss(y, p, FINDINGS) == pytest.approx(sum(rows) / 3)
    # without a finding named `any`, every finding weighs 1
    assert weighted_log_loss(y, p, ["a", "b", "c"]) == pytest.approx((left + right + any_) / 3)


def test_sorted_auc_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(1)
    s = np.round(rng.random(300), 2)  # ties
    pos = rng.random(300) < s
    w = rng.multinomial(300, np.full(300, 1 / 300), size=3).astype(float)
    for b in range(3):
        assert sorted_auc(s, pos, w)[b] == pytest.approx(roc_auc_score(pos, s, sample_weight=w[b]))


def test_patient_bootstrap_is_degenerate_for_a_perfect_model_and_resamples_patients():
    y = _targets(60)
    patients = np.repeat(np.arange(30), 2)
    ci = bootstrap_intervals(y, y, FINDINGS, [0.5] * 3, 200, 0.95, patients, seed=0)
    assert ci["macro_roc_auc"] == [1.0, 1.0] and ci["micro_roc_auc"] == [1.0, 1.0]
    assert ci["per_class"]["left"]["sensitivity"] == [1.0, 1.0] and ci["per_class"]["any"]["pr_auc"] == [1.0, 1.0]
    assert ci["weighted_log_loss"][1] < 1e-12 and ci["unit"] == "patient"
    # four identical images per patient carry one patient's information: the patient interval of the
    # 4x data is as wide as the patients' alone, the naive image interval about half as wide
    rng = np.random.default_rng(2)
    y = _targets(80, seed=3)
    p = np.clip(y * 0.3 + rng.random(y.shape) * 0.7, 0, 1)
    y4, p4, pat = np.repeat(y, 4, 0), np.repeat(p, 4, 0), np.repeat(np.arange(80), 4)
    width = lambda c: c["macro_roc_auc"][1] - c["macro_roc_auc"][0]  # noqa: E731
    single = bootstrap_intervals(y, p, FINDINGS, [0.5] * 3, 1000, 0.95, None, 3)
    cluster = bootstrap_intervals(y4, p4, FINDINGS, [0.5] * 3, 1000, 0.95, pat, 3)
    naive = bootstrap_intervals(y4, p4, FINDINGS, [0.5] * 3, 1000, 0.95, None, 3)
    assert width(cluster) == pytest.approx(width(single), rel=0.2)
    assert width(naive) == pytest.approx(width(single) / 2, rel=0.25)
    m = multilabel_metrics(y, p, FINDINGS)
    assert single["weighted_log_loss"][0] < m["weighted_log_loss"] < single["weighted_log_loss"][1]


def test_thresholds_are_chosen_on_validation_and_applied_on_test():
    rng = np.random.default_rng(0)
    vy = _targets(60, seed=4)
    vp = np.clip(0.15 + 0.3 * vy + 0.3 * rng.random(vy.shape), 0, 1)  # positives sit above ~0.45
    ty = _targets(50, seed=5)
    tp = np.clip(0.15 + 0.3 * ty + 0.3 * rng.random(ty.shape), 0, 1)
    s = {**section_defaults("evaluate"), "temperature_scaling": False}
    vy[:, 1] = 0  # validation without a `right` positive: that finding keeps 0.5, with a note
    cals, scaled, d = calibrate_and_decide(tp, ty, (vp, vy), FINDINGS, s)
    assert scaled is None and not d["calibrated"]
    assert d["thresholds"]["left"] == pytest.approx(youden_threshold(vp[:, 0], vy[:, 0] == 1))
    assert d["thresholds"]["right"] == 0.5 and "right" in d["notes"] and d["chosen_on"]["right"] is None
    t = [d["raw_thresholds"][c] for c in FINDINGS]
    m = multilabel_metrics(ty, tp, FINDINGS, t)
    left = tp[:, 0] >= d["thresholds"]["left"]
    assert m["labels"]["left"]["sensitivity"] == pytest.approx(left[ty[:, 0] == 1].mean())
    assert m["labels"]["left"]["specificity"] == pytest.approx((~left)[ty[:, 0] == 0].mean())
    # with a temperature per finding the threshold is on the calibrated probability and the raw
    # threshold is the same cut on the model's own
    cals, scaled, d = calibrate_and_decide(tp, ty, (vp, vy), FINDINGS, {**s, "temperature_scaling": True})
    temp = d["temperatures"]["left"]
    assert temp == cals["left"]["temperature"] and scaled.shape == tp.shape
    assert d["thresholds"]["left"] == pytest.approx(youden_threshold(scale_binary(vp[:, 0], temp), vy[:, 0] == 1))
    assert scale_binary(np.array([d["raw_thresholds"]["left"]]), temp)[0] == pytest.approx(d["thresholds"]["left"])


def test_a_finding_absent_from_a_split_is_left_out_not_an_error():
    y = _targets(30)
    y[:, 1] = 0  # no `right` on this test split
    p = np.clip(y * 0.6 + 0.2, 0, 1)
    m = multilabel_metrics(y, p, FINDINGS)
    assert m["labels"]["right"]["roc_auc"] is None and m["labels"]["right"]["sensitivity"] is None
    assert m["macro_roc_auc"] == 1.0  # the mean over the findings that have both classes
    ci = bootstrap_intervals(y, p, FINDINGS, [0.5] * 3, 100, 0.95, None, 0)
    assert ci["per_class"]["right"]["roc_auc"] is None and ci["macro_roc_auc"] == [1.0, 1.0]
    # no validation split: every threshold 0.5, no temperature, and the record says why
    _, scaled, d = calibrate_and_decide(p, y, None, FINDINGS, section_defaults("evaluate"))
    assert scaled is None and set(d["thresholds"].values()) == {0.5} and set(d["notes"]) == set(FINDINGS)


def test_rows_on_known_scores():
    task = MultiLabel()
    scores = np.array([[0.9, 0.1, 0.95], [0.2, 0.3, 0.4], [0.6, 0.7, 0.8]])
    d = {"calibrated": False, "thresholds": {"left": 0.5, "right": 0.65, "any": 0.45}, "temperatures": {}}
    rows = task.rows(scores, {"decision": d}, FINDINGS)
    assert [r["predicted"] for r in rows] == ["left+any", "none", "left+right+any"]
    assert list(rows[0]) == task.prediction_columns(FINDINGS) and rows[1]["pcal_any"] == rows[1]["p_any"]
    # calibrated thresholds read the calibrated probabilities: T = 2 pulls 0.6 to ~0.55, under 0.58
    d = {"calibrated": True, "thresholds": {"left": 0.58, "right": 0.5, "any": 0.5},
         "temperatures": {"left": 2.0, "right": 1.0, "any": 1.0}}
    rows = task.rows(scores, {"decision": d}, FINDINGS)
    assert rows[2]["pcal_left"] == pytest.approx(1 / (1 + math.sqrt(0.4 / 0.6)))
    assert [r["predicted"] for r in rows] == ["left+any", "none", "right+any"]
    assert task.rows(scores[:0], {}, FINDINGS) == []


# ---------------------------------------------------------------------------------------------
# the training loop and the evaluate stage on a tiny project
def squares(y: np.ndarray, size: int = 24, seed: int = 0) -> np.ndarray:
    """``left``: a bright square in the left half, ``right``: in the right half (both, or none)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (len(y), 1, size, size))
    for i, (a, b, _) in enumerate(y):
        for on, off in ((a, 0), (b, size // 2)):
            if on:
                r, c = rng.integers(1, size - 7), rng.integers(1, size // 2 - 6) + off
                x[i, 0, r:r + 6, c:c + 6] = 230
    return x.astype(np.uint8)


def labels_for(n: int) -> np.ndarray:
    ab = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])[np.arange(n) % 4]
    return np.concatenate([ab, ab.max(1, keepdims=True)], 1).astype(np.float32)


def store(path: Path, n: int, seed: int) -> Path:
    from zarr.dtype import VariableLengthUTF8

    y = labels_for(n)
    g = zarr.open_group(path, mode="w")
    g.create_array("images", data=squares(y, seed=seed), chunks=(16, 1, 24, 24))
    g.create_array("labels", data=y, chunks=(n, 3))
    cols = {"patient": [f"P{seed}-{i // 2}" for i in range(n)], "sex": np.where(np.arange(n) % 8 < 4, "F", "M"),
            "age_band": [""] * n, "site": np.where(np.arange(n) % 3 == 0, "S1", "S2")}
    for col, values in cols.items():
        arr = g.create_array(col, shape=(n,), dtype=VariableLengthUTF8(), chunks=(n,))
        arr[:] = np.asarray(values, dtype=object)
    g.attrs.update({"classes": FINDINGS, "size": 24, "channels": 1, "mode": "gray", "mean": [0.3], "std": [0.3]})
    return path


def test_one_epoch_of_fit(tmp_path):
    from haven.learn.train import fit

    train, val = store(tmp_path / "train.zarr", 32, 0), store(tmp_path / "val.zarr", 16, 1)
    res = fit(train, val, {"backbone": "test_resnet", "weights": None},
              {"epochs": 1, "freeze_epochs": 0, "batch_size": 16, "threads": 1, "lr": 3e-3},
              tmp_path / "run", seed=0, max_epochs=1, task=MultiLabel())
    h = res.history[0]
    assert {"val_macro_roc_auc", "val_micro_roc_auc", "val_loss"} <= set(h) and 0 <= h["val_macro_roc_auc"] <= 1
    assert np.isfinite(h["train_loss"]) and h["val_loss"] > 0
    with torch.no_grad():
        assert res.model(torch.zeros(2, 1, 24, 24)).shape == (2, 3)


def _tiny(root: Path, steps: int = 40) -> Path:
    pre = root / "preprocess"
    pre.mkdir(parents=True)
    store(pre / "test.zarr", 48, 2)
    store(pre / "val.zarr", 32, 3)
    task = MultiLabel()
    ytr = labels_for(48)
    loss_fn = task.loss(ytr, FINDINGS, {"balance": "loss"})
    model = train_briefly(squares(ytr, seed=9), ytr, loss_fn, 3, steps)
    save_model(root, model, FINDINGS, task="multilabel", task_options={"summary_label": None})
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = _tiny(tmp_path_factory.mktemp("multilabel") / "proj")
    settings = {**section_defaults("evaluate"), **FAST, "positive_label": None, "bootstrap": 100}
    metrics = evaluate_all(root, settings, "multilabel", seed=1, tta={"enabled": True, "hflip": True},
                           task_options={"summary_label": None})
    return root, metrics


def test_evaluate_writes_every_output_and_the_multilabel_metrics(evaluated):
    root, m = evaluated
    out = root / "evaluate"
    assert_every_figure(out)
    saved = json.loads((out / "metrics.json").read_text())  # strict JSON: no NaN
    assert saved["n"] == 48 and saved["classes"] == FINDINGS and saved["summary_label"] == "any"
    ci = saved["ci"]
    assert ci["unit"] == "patient" and ci["macro_roc_auc"][0] <= saved["macro_roc_auc"] <= ci["macro_roc_auc"][1]
    assert saved["roc_auc"] == saved["macro_roc_auc"] > 0.7  # the squares are easy: even a brief fit ranks them
    assert set(saved["per_class"]) == set(FINDINGS) and set(ci["per_class"]["left"]) >= {"sensitivity", "roc_auc"}
    d = saved["decision"]
    assert set(d["thresholds"]) == set(FINDINGS) and d["chosen_on"]["any"] == "val" and d["calibrated"]
    assert all(saved["labels"][c]["threshold"] == pytest.approx(d["raw_thresholds"][c]) for c in FINDINGS)
    assert saved["calibration"]["label"] == "any" and saved["calibration"]["temperature"] > 0
    assert set(saved["calibration_per_label"]) == set(FINDINGS)
    sg = saved["subgroups"]
    assert set(sg["attributes"]) == {"sex", "site"} and set(sg["per_label"]) == set(FINDINGS)
    assert sg["flagged"] == bool(sg["flagged_labels"]) and sg["positive_class"] == "any"
    table = pd.read_csv(out / "subgroups.csv")
    assert list(table.columns) == ["label", "attribute", "group", "metric", "value"]
    assert set(table["label"]) == set(FINDINGS)
    ex = saved["explain"]
    assert set(ex["gradcam_per_label"]) == set(FINDINGS) and sum(ex["gradcam_per_label"].values()) >= 3
    assert -1 <= ex["randomization_spearman"]["gradcam"] <= 1
    rob = saved["robustness"]
    assert rob["n"] == 16 and rob["pgd"][-1] <= rob["fgsm"][-1] <= rob["fgsm"][0] == rob["clean_accuracy"]
    assert saved["tta"]["macro_roc_auc"]["without"] == saved["macro_roc_auc"]
    assert [t["title"] for t in saved["tables"]][:2] == ["Multi-label summary", "Per finding"]
    assert all(isinstance(c, (str, int, float)) for t in saved["tables"] for r in t["rows"] for c in r)
    assert [r[0] for r in saved["tables"][1]["rows"]] == FINDINGS
    npz = np.load(out / "predictions.npz")
    assert npz["probs"].shape == (48, 3) and npz["probs_temperature_scaled"].shape == (48, 3)
    flat = ev.flat_metrics(saved, "multilabel", {})
    for key in ("test_macro_roc_auc", "test_macro_roc_auc_ci_low", "test_micro_roc_auc", "test_weighted_log_loss",
                "test_roc_auc_left", "test_pr_auc_any", "test_sensitivity_right", "test_ece_any",
                "test_balanced_accuracy", "test_roc_auc", "test_subgroup_gap_flag", "test_fgsm_accuracy_eps_0.05",
                "test_tta_macro_roc_auc", "test_threshold_left"):
        assert key in flat, key
    assert all(np.isfinite(v) for v in flat.values())


def test_bundle_predicts_the_findings_with_the_evaluated_thresholds(evaluated):
    from haven.learn.checkpoint import load_model
    from haven.predict.bundle import Bundle, evaluation_record

    root, m = evaluated
    model, meta = load_model(root / "train" / "model.pt")
    bundle = Bundle(model, meta, evaluation_record(m))
    test = zarr.open_group(root / "preprocess" / "test.zarr", mode="r")
    rows = bundle.predict(np.asarray(test["images"][:8]))
    probs = np.load(root / "evaluate" / "predictions.npz")["probs"][:8]
    assert [r["p_left"] for r in rows] == pytest.approx(probs[:, 0].tolist(), abs=1e-5)
    raw = [m["decision"]["raw_thresholds"][c] for c in FINDINGS]
    expected = ["+".join(c for c, q, t in zip(FINDINGS, p, raw) if q >= t) or "none" for p in probs]
    assert [r["predicted"] for r in rows] == expected
