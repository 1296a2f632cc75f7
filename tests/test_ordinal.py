"""Ordinal grading: labels, the CORN and softmax heads in the training loop, kappa and the
referable view on known inputs, the patient bootstrap, the evaluate stage end to end and the
prediction rows."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from test_evaluate import FAST, make_split
from tinyproject import assert_every_figure, evaluate_all, save_model, train_briefly

from haven.config import section_defaults
from haven.learn.tasks import get_task
from haven.learn.tasks.ordinal import CornLoss, Ordinal, corn_probabilities
from haven.trust import evaluate as ev
from haven.trust.decision import view_probabilities
from haven.trust.ordinal_metrics import (bootstrap_intervals, grade, grade_replicates, ordinal_metrics,
                                         quadratic_kappa)


# ---------------------------------------------------------------------------------------------
# labels
def test_grades_are_the_integers_and_anything_else_is_named():
    task = get_task("ordinal", {"grades": 5})
    labels = pd.Series(["0", "4", "2", "2"])
    assert task.classes(labels) == ["0", "1", "2", "3", "4"]  # every grade, present or not
    enc = task.encode(labels, task.classes(labels))
    assert enc.dtype == np.int64 and enc.tolist() == [0, 4, 2, 2]
    assert task.counts(labels, task.classes(labels)) == {"0": 1, "1": 0, "2": 2, "3": 0, "4": 1}
    for bad in ("3.0", "moderate", "7", "-1"):
        with pytest.raises(ValueError) as e:
            task.classes(pd.Series(["0", bad]))
        assert repr(bad) in str(e.value) and "0..4" in str(e.value) and "ordinal.grades" in str(e.value)
    with pytest.raises(ValueError, match="ordinal.referable"):
        get_task("ordinal", {"grades": 3, "referable": 3}).classes(labels.iloc[:1])


def test_head_width_follows_the_method_and_the_trial():
    task = Ordinal({"grades": 5})
    classes = [str(i) for i in range(5)]
    assert task.outputs(classes) == 4 and task.outputs(classes, {"ordinal_method": "softmax"}) == 5
    assert Ordinal({"grades": 5, "method": "softmax"}).outputs(classes, {}) == 5
    assert task.val_metric == "val_qwk"


# ---------------------------------------------------------------------------------------------
# CORN
def test_corn_loss_is_the_conditional_bce_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0], [math.log(3), 0.5]])
    y = torch.tensor([0, 1, 2])

    def bce(z, t):
        p = 1 / (1 + math.exp(-z))
        return -math.log(p) if t else -math.log(1 - p)

    # task 0 (P(y > 0)) trains on all three, task 1 (P(y > 1 | y > 0)) on the two with y >= 1
    terms = [bce(0.0, 0), bce(2.0, 1), bce(math.log(3), 1), bce(-1.0, 0), bce(0.5, 1)]
    assert float(CornLoss(3)(logits, y)) == pytest.approx(sum(terms) / 5, rel=1e-6)
    # grade weights weigh every term of a sample: a weight of 0 on grade 2 drops its two terms
    w = CornLoss(3, torch.tensor([1.0, 1.0, 0.0]))(logits, y)
    assert float(w) == pytest.approx((terms[0] + terms[1] + terms[3]) / 3, rel=1e-6)


def test_corn_scores_are_a_rank_consistent_distribution():
    torch.manual_seed(0)
    logits = torch.randn(200, 4) * 3
    p = corn_probabilities(logits).numpy()
    assert (p >= 0).all() and np.allclose(p.sum(1), 1, atol=1e-6)
    above = np.cumprod(torch.sigmoid(logits).numpy(), 1)  # P(y > k), the chain of conditionals
    assert (np.diff(above, axis=1) <= 1e-7).all()
    assert np.allclose(1 - np.cumsum(p, 1)[:, :-1], above, atol=1e-5)
    # the median grade is CORN's own rule: the number of P(y > k) above one half
    assert (grade(p) == (above > 0.5).sum(1)).all()
    task = Ordinal({"grades": 5})
    assert torch.allclose(task.scores(logits), torch.from_numpy(p))  # width 4: CORN
    wide = torch.randn(3, 5)
    assert torch.allclose(task.scores(wide), torch.softmax(wide, 1))  # width 5: softmax
    with pytest.raises(ValueError, match="4 \\(corn\\) or 5 \\(softmax\\)"):
        task.scores(torch.randn(3, 3))
    # an ensemble hands the members' mean grade probabilities on as logits of either head
    mean = (task.scores(logits) + task.scores(logits.flip(0))) / 2
    for width in (4, 5):
        assert torch.allclose(task.scores(task.logits(mean, width)), mean, atol=1e-5)


def test_median_grade_respects_the_order():
    # argmax would say 4; a grader torn between 0 and 4 with 40/60 is best served by the median
    assert grade(np.array([[0.4, 0.0, 0.0, 0.0, 0.6], [0.3, 0.3, 0.4, 0, 0], [1, 0, 0, 0, 0.0]])).tolist() == [4, 1, 0]
    assert grade(np.array([[0.2, 0.2, 0.2, 0.2, 0.2]])).tolist() == [2]


# ---------------------------------------------------------------------------------------------
# kappa and the referable view
def test_quadratic_kappa_known_values():
    y = np.array([0, 1, 2, 3, 4, 2, 1, 0])
    assert quadratic_kappa(y, y, 5) == pytest.approx(1.0)
    assert quadratic_kappa(y, np.full(len(y), 2), 5) == pytest.approx(0.0)  # a constant grader: chance
    # by hand: O = [[1,0,0],[0,0,1],[0,0,1]], E = outer([1,1,1], [1,0,2]) / 3, W = (i-j)^2
    # sum W*O = 1, sum W*E = 8/3 + 1 + 4/3 = 5: kappa = 1 - 1/5
    yt, yp = np.array([0, 1, 2]), np.array([0, 2, 2])
    assert quadratic_kappa(yt, yp, 3) == pytest.approx(0.8)
    assert cohen_kappa_score(yt, yp, weights="quadratic") == pytest.approx(0.8)
    assert quadratic_kappa(np.zeros(4, int), np.zeros(4, int), 3) is None  # undefined, not NaN
    rng = np.random.default_rng(0)
    assert abs(quadratic_kappa(rng.integers(0, 5, 20_000), rng.integers(0, 5, 20_000), 5)) < 0.03  # chance


def test_vectorized_kappa_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 5, 80), rng.integers(0, 5, 80)
    pred[:40] = y[:40]
    w = rng.multinomial(80, np.full(80, 1 / 80), size=4).astype(float)
    reps = grade_replicates(y, pred, w, 5)
    for b in range(4):
        assert reps["qwk"][b] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic", sample_weight=w[b]))
        assert reps["mae"][b] == pytest.approx(np.average(np.abs(y - pred), weights=w[b]))


def _scores_for(pred: np.ndarray, k: int = 5, sure: float = 0.9) -> np.ndarray:
    return np.eye(k)[pred] * sure + (1 - sure) / k


def test_metrics_of_a_perfect_grader_and_the_referable_view_by_hand():
    y = np.repeat(np.arange(5), 4)
    m = ordinal_metrics(y, _scores_for(y), cut=2)
    assert m["qwk"] == pytest.approx(1.0) and m["accuracy"] == 1.0 and m["mae"] == 0.0
    assert m["balanced_accuracy"] == 1.0 and np.trace(np.array(m["confusion_matrix"])) == 20
    assert m["per_class"]["3"] == {"sensitivity": 1.0, "specificity": 1.0}
    assert m["roc_auc"] == m["referable"]["roc_auc"] == 1.0
    # known P(referable): the grade-3 image at 0.35 sits below one grade-1 image at 0.4
    y = np.array([0, 1, 1, 3, 4, 2])
    p_ref = np.array([0.1, 0.2, 0.4, 0.35, 0.9, 0.8])
    scores = np.stack([1 - p_ref, np.zeros(6), p_ref, np.zeros(6), np.zeros(6)], 1)  # mass on grades 0 and 2
    m = ordinal_metrics(y, scores, cut=2, threshold=0.3)
    assert m["referable"]["roc_auc"] == pytest.approx(8 / 9)  # of 3 x 3 pairs, (0.4, 0.35) is mis-ordered
    assert m["referable"]["roc_auc"] == pytest.approx(roc_auc_score(y >= 2, p_ref))
    assert m["referable"]["sensitivity"] == 1.0 and m["referable"]["specificity"] == pytest.approx(2 / 3)
    assert m["referable"]["threshold_chosen_on"] == "val"
    # the re-centred view keeps the order and puts the threshold at 0.5
    q = view_probabilities(p_ref, 0.3)
    assert (np.argsort(q[:, 1]) == np.argsort(p_ref)).all() and ((q[:, 1] > 0.5) == (p_ref >= 0.3)).all()


def test_patient_bootstrap_of_a_perfect_grader_is_degenerate():
    y = np.repeat(np.arange(5), 6)
    patients = np.repeat(np.arange(15), 2)  # two eyes per patient
    ci = bootstrap_intervals(y, _scores_for(y), 2, 0.5, 200, 0.95, patients, seed=0)
    assert ci["qwk"] == [1.0, 1.0] and ci["accuracy"] == [1.0, 1.0] and ci["mae"] == [0.0, 0.0]
    assert ci["roc_auc"] == [1.0, 1.0] and ci["referable_sensitivity"] == [1.0, 1.0]
    assert ci["per_class"]["4"]["sensitivity"] == [1.0, 1.0] and ci["unit"] == "patient"
    # an imperfect grader: the interval holds the estimate
    pred = y.copy()
    pred[::4] = np.minimum(pred[::4] + 1, 4)
    m = ordinal_metrics(y, _scores_for(pred), 2)
    ci = bootstrap_intervals(y, _scores_for(pred), 2, 0.5, 300, 0.95, patients, seed=0)
    assert ci["qwk"][0] < m["qwk"] <= ci["qwk"][1] and ci["mae"][0] <= m["mae"] < ci["mae"][1]


def test_referable_view_is_a_two_class_model_at_the_threshold():
    from haven.learn.models import backbone_stages, build_model
    from haven.trust.ordinal import ReferableView

    torch.manual_seed(0)
    net = build_model("test_resnet", 3, weights=None, in_chans=1).eval()  # a 4-grade CORN head
    task = Ordinal({"grades": 4, "referable": 2})
    x = torch.randn(20, 1, 16, 16)
    view = ReferableView(net, task, cut=2, threshold=0.3)
    with torch.no_grad():
        out, p = view(x), task.scores(net(x))[:, 2:].sum(1)
    # softmax of the view's logits is P(referable) re-centred at the threshold, argmax the call
    q = torch.softmax(out, 1)[:, 1]
    assert ((q > 0.5) == (p >= 0.3)).all() and (torch.argsort(q) == torch.argsort(p)).all()
    assert torch.allclose(out[:, 0], -out[:, 1])  # both classes carry gradient
    # what the view lacks comes from the model: Grad-CAM finds the backbone's stages through it
    assert [id(m) for m in backbone_stages(view)] == [id(m) for m in backbone_stages(net)]


# ---------------------------------------------------------------------------------------------
# the training loop, both heads
def graded_images(y: np.ndarray, size: int = 24, seed: int = 0) -> np.ndarray:
    """Grade g: a square of brightness 60 + 60 g on dark noise (grade 0 shows a faint one)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, (len(y), 1, size, size))
    for i, g in enumerate(y):
        r, c = rng.integers(1, size - 9, 2)
        x[i, 0, r:r + 8, c:c + 8] = 60 + 60 * g
    return x.astype(np.uint8)


def _store(path: Path, n: int, seed: int, k: int = 4) -> Path:
    y = np.arange(n) % k
    cols = {"patient": [f"P{seed}-{i // 2}" for i in range(n)], "sex": np.where(np.arange(n) % 4 < 2, "F", "M"),
            "age_band": [""] * n, "site": np.where(np.arange(n) % 3 == 0, "S1", "S2")}
    make_split(path, graded_images(y, seed=seed), y, [str(i) for i in range(k)], cols, [0.3], [0.3])
    return path


@pytest.mark.parametrize("method, width", [("corn", 3), ("softmax", 4)])
def test_both_heads_train_through_fit(tmp_path, method, width):
    from haven.learn.train import fit

    train, val = _store(tmp_path / "train.zarr", 32, 0), _store(tmp_path / "val.zarr", 16, 1)
    task = Ordinal({"grades": 4, "referable": 2})
    res = fit(train, val, {"backbone": "test_resnet", "weights": None},
              {"epochs": 1, "freeze_epochs": 0, "batch_size": 16, "threads": 1, "lr": 3e-3},
              tmp_path / "run", seed=0, overrides={"ordinal_method": method}, max_epochs=1, task=task)
    h = res.history[0]
    assert {"val_qwk", "val_loss", "val_accuracy"} <= set(h) and -1 <= h["val_qwk"] <= 1
    assert np.isfinite(h["train_loss"]) and h["val_loss"] > 0
    with torch.no_grad():
        out = res.model(torch.zeros(2, 1, 24, 24))
    assert out.shape[1] == width
    assert np.allclose(task.scores(out).sum(1).numpy(), 1, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the evaluate stage end to end, and the rows a prediction writes
def _tiny_ordinal(root: Path, steps: int = 40) -> Path:
    """preprocess/{test,val}.zarr with 4 grades and a test_resnet trained briefly with CORN."""
    pre = root / "preprocess"
    pre.mkdir(parents=True)
    _store(pre / "test.zarr", 40, 2)
    _store(pre / "val.zarr", 24, 3)
    task = Ordinal({"grades": 4, "referable": 2})
    ytr = np.arange(48) % 4
    loss_fn = task.loss(ytr, ["0", "1", "2", "3"], {"balance": "none"})
    model = train_briefly(graded_images(ytr, seed=9), ytr, loss_fn, 3, steps)
    save_model(root, model, ["0", "1", "2", "3"], task="ordinal",
               task_options={"grades": 4, "method": "corn", "referable": 2})
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = _tiny_ordinal(tmp_path_factory.mktemp("ordinal") / "proj")
    settings = {**section_defaults("evaluate"), **FAST, "positive_label": None, "bootstrap": 100}
    metrics = evaluate_all(root, settings, "ordinal", seed=1, tta={"enabled": True, "hflip": True},
                           task_options={"grades": 4, "referable": 2})
    return root, metrics


def test_evaluate_writes_every_output_and_the_ordinal_metrics(evaluated):
    root, m = evaluated
    out = root / "evaluate"
    assert_every_figure(out)
    saved = json.loads((out / "metrics.json").read_text())  # strict JSON: no NaN
    assert saved["n"] == 40 and saved["classes"] == ["0", "1", "2", "3"]
    assert np.array(saved["confusion_matrix"]).shape == (4, 4) and set(saved["per_class"]) == {"0", "1", "2", "3"}
    ci = saved["ci"]
    assert ci["unit"] == "patient" and ci["qwk"][0] <= saved["qwk"] <= ci["qwk"][1]
    assert ci["roc_auc"][0] <= saved["roc_auc"] <= ci["roc_auc"][1]
    assert saved["qwk"] > 0.5  # the squares' brightness is the grade: even a brief fit ranks them
    assert saved["roc_auc"] == saved["referable"]["roc_auc"] and saved["referable"]["definition"] == "grade >= 2"
    d = saved["decision"]
    assert d["chosen_on"] == "val" and 0 < d["threshold"] < 1 and d["referable_cut"] == 2
    assert saved["referable"]["threshold"] == d["threshold"]
    assert saved["calibration"]["temperature"] > 0 and saved["calibration"]["ece_scaled"] is not None
    sg = saved["subgroups"]
    assert set(sg["attributes"]) == {"sex", "site"} and sg["positive_class"] == "referable"
    assert {e["label"] for e in saved["explain"]["examples"]} <= {"referable", "not referable"}
    rob = saved["robustness"]
    assert rob["n"] == 16 and rob["pgd"][-1] <= rob["fgsm"][-1] <= rob["fgsm"][0] == rob["clean_accuracy"]
    assert set(saved["tta"]) >= {"qwk", "accuracy", "roc_auc"} and saved["tta"]["qwk"]["without"] == saved["qwk"]
    titles = [t["title"] for t in saved["tables"]]
    assert len(titles) == 3 and all(isinstance(c, (str, int, float)) for t in saved["tables"] for r in t["rows"]
                                    for c in r)
    assert saved["tables"][1]["rows"][0][0] == "0" and len(saved["tables"][2]["rows"]) == 4
    assert (out / "subgroups.csv").read_text().startswith("attribute,group,metric,value")
    npz = np.load(out / "predictions.npz")
    assert npz["probs"].shape == (40, 4) and npz["p_referable"].shape == (40,)
    flat = ev.flat_metrics(saved, "ordinal", {"grades": 4, "referable": 2})
    for key in ("test_qwk", "test_qwk_ci_low", "test_mae", "test_accuracy", "test_balanced_accuracy",
                "test_referable_roc_auc", "test_roc_auc", "test_sensitivity_3", "test_ece", "test_tta_qwk",
                "test_fgsm_accuracy_eps_0.05", "test_subgroup_gap_flag", "test_referable_threshold"):
        assert key in flat, key
    assert all(np.isfinite(v) for v in flat.values())


def test_rows_on_known_scores():
    task = Ordinal({"grades": 4, "referable": 2})
    classes = ["0", "1", "2", "3"]
    scores = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.3, 0.3, 0.3], [0.0, 0.1, 0.2, 0.7]])
    rows = task.rows(scores, {"temperature": None, "decision": {"threshold": 0.5}}, classes)
    assert [r["predicted"] for r in rows] == ["0", "2", "3"]
    assert [r["p_referable"] for r in rows] == pytest.approx([0.1, 0.6, 0.9])
    assert [r["referable"] for r in rows] == ["no", "yes", "yes"]
    assert list(rows[0]) == task.prediction_columns(classes) and rows[1]["pcal_3"] == rows[1]["p_3"]
    strict = task.rows(scores, {"temperature": 2.0, "decision": {"threshold": 0.75}}, classes)
    assert [r["referable"] for r in strict] == ["no", "no", "yes"]
    assert [r["predicted"] for r in strict] == ["0", "2", "3"]  # calibration never moves a grade
    assert strict[0]["pcal_0"] < 0.7 and sum(strict[0][f"pcal_{c}"] for c in classes) == pytest.approx(1)
    assert task.rows(scores[:0], {}, classes) == []


def test_bundle_predicts_grades_with_the_evaluated_threshold(evaluated):
    from haven.learn.checkpoint import load_model
    from haven.predict.bundle import Bundle, evaluation_record

    root, m = evaluated
    model, meta = load_model(root / "train" / "model.pt")
    bundle = Bundle(model, meta, evaluation_record(m))
    test = zarr.open_group(root / "preprocess" / "test.zarr", mode="r")
    rows = bundle.predict(np.asarray(test["images"][:6]))
    npz = np.load(root / "evaluate" / "predictions.npz")
    t = m["decision"]["threshold"]
    assert [r["p_referable"] for r in rows] == pytest.approx(npz["p_referable"][:6].tolist(), abs=1e-5)
    assert [r["referable"] for r in rows] == ["yes" if p >= t else "no" for p in npz["p_referable"][:6]]
    assert [r["predicted"] for r in rows] == [str(g) for g in grade(npz["probs"][:6])]
