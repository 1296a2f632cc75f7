"""Evaluate: every computation checked on inputs with a known answer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, roc_auc_score)
from torch import nn

from haven.config import section_defaults
from tinyproject import assert_every_figure, evaluate_all, save_model, train_briefly
from haven.trust import evaluate as ev
from haven.trust.calibration import calibration, expected_calibration_error
from haven.trust.explain import (attribution_maps, randomization_test, randomized_copy, rank_similarity,
                                 select_examples)
from haven.trust.metrics import (bootstrap_ci, compute_metrics, positive_index, replicate_metrics, weighted_auc,
                                 weighted_average_precision)
from haven.trust.robustness import robustness, stratified_subsample
from haven.trust.subgroups import subgroup_audit


# ---------------------------------------------------------------------------------------------
# metrics
def test_metrics_on_known_predictions():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # predicts class 1 for samples 3,4,5,6 : one false positive, one false negative
    p1 = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    m = compute_metrics(y, probs, ["normal", "hemorrhage"])
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["per_class"]["hemorrhage"]["sensitivity"] == pytest.approx(0.75)
    assert m["per_class"]["hemorrhage"]["specificity"] == pytest.approx(0.75)
    # ROC AUC by hand: of 16 (neg, pos) pairs, only (0.6, 0.4) is mis-ordered
    assert m["roc_auc"] == pytest.approx(15 / 16)
    # PR AUC by hand: ranked .9 .8 .7 (pos) .6 (neg) .4 (pos): precision 1, 1, 1, 4/5 at each positive
    assert m["pr_auc"] == pytest.approx((1 + 1 + 1 + 0.8) / 4)
    assert m["positive_class"] == "hemorrhage"
    # the other class as positive: same AUC, its own PR AUC
    m0 = compute_metrics(y, probs, ["normal", "hemorrhage"], positive=0)
    assert m0["roc_auc"] == pytest.approx(15 / 16)
    assert m0["pr_auc"] == pytest.approx(average_precision_score(y == 0, probs[:, 0]))


def test_multiclass_auc_and_perfect_model():
    y = np.repeat(np.arange(3), 4)
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == 1.0 and m["roc_auc"] == 1.0 and m["pr_auc"] == 1.0
    assert np.trace(np.array(m["confusion_matrix"])) == 12


def test_auc_undefined_when_a_class_is_missing():
    y = np.array([0, 0, 0])
    probs = np.array([[0.9, 0.1]] * 3)
    m = compute_metrics(y, probs, ["a", "b"])
    assert m["roc_auc"] is None and m["pr_auc"] is None


def test_positive_label_must_be_a_class():
    assert positive_index(["hemorrhage", "normal"], "hemorrhage") == 0
    assert positive_index(["hemorrhage", "normal"], None) == 1
    with pytest.raises(ValueError, match="not a class"):
        positive_index(["a", "b"], "c")


# ---------------------------------------------------------------------------------------------
# bootstrap
def test_vectorized_replicates_equal_sklearn_with_sample_weights():
    rng = np.random.default_rng(0)
    n, k = 60, 3
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n).round(2)  # rounding makes ties
    probs /= probs.sum(1, keepdims=True)
    w = rng.multinomial(n, np.full(n, 1 / n), size=5).astype(float)
    reps = replicate_metrics(y, probs, w, positive=1)
    for b in range(5):
        pred, sw = probs.argmax(1), w[b]
        assert reps["accuracy"][b] == pytest.approx(accuracy_score(y, pred, sample_weight=sw))
        assert reps["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(y, pred, sample_weight=sw))
        for c in range(k):
            assert weighted_auc(probs[:, c], y == c, w[b:b + 1])[0] == pytest.approx(
                roc_auc_score(y == c, probs[:, c], sample_weight=sw))
            assert weighted_average_precision(probs[:, c], y == c, w[b:b + 1])[0] == pytest.approx(
                average_precision_score(y == c, probs[:, c], sample_weight=sw))
        assert reps["roc_auc"][b] == pytest.approx(
            np.mean([roc_auc_score(y == c, probs[:, c], sample_weight=sw) for c in range(k)]))


def _accuracy_probs(n, n_correct):
    y = np.tile([0, 1], n // 2)
    pred = y.copy()
    pred[:n - n_correct] = 1 - pred[:n - n_correct]
    return y, np.eye(2)[pred] * 0.8 + 0.1


def test_bootstrap_interval_matches_the_binomial_width():
    y, probs = _accuracy_probs(400, 320)  # accuracy 0.8
    ci = bootstrap_ci(y, probs, ["a", "b"], n_resamples=2000, seed=1)
    lo, hi = ci["accuracy"]
    assert lo < 0.8 < hi
    expected = 2 * 1.96 * np.sqrt(0.8 * 0.2 / 400)  # 0.078
    assert hi - lo == pytest.approx(expected, rel=0.15)
    assert ci["unit"] == "image" and ci["resamples"] == 2000


def test_perfect_model_has_a_degenerate_interval():
    y = np.repeat([0, 1, 2], 10)
    ci = bootstrap_ci(y, np.eye(3)[y], ["a", "b", "c"], n_resamples=200)
    assert ci["accuracy"] == [1.0, 1.0] and ci["roc_auc"] == [1.0, 1.0]
    assert ci["per_class"]["b"]["sensitivity"] == [1.0, 1.0]


def test_cluster_bootstrap_resamples_patients_not_slices():
    """Four identical slices per patient carry the information of one: the patient-level interval
    of the 4x data equals the interval of the patients alone, the naive one is half as wide."""
    y, probs = _accuracy_probs(100, 80)
    y4, p4 = np.repeat(y, 4), np.repeat(probs, 4, axis=0)
    patients = np.repeat(np.arange(100), 4)
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]  # noqa: E731
    single = bootstrap_ci(y, probs, ["a", "b"], 2000, seed=3)
    cluster = bootstrap_ci(y4, p4, ["a", "b"], 2000, clusters=patients, seed=3)
    naive = bootstrap_ci(y4, p4, ["a", "b"], 2000, seed=3)
    assert cluster["unit"] == "patient"
    assert width(cluster) == pytest.approx(width(single), rel=0.15)
    assert width(naive) == pytest.approx(width(single) / 2, rel=0.2)


# ---------------------------------------------------------------------------------------------
# calibration
def test_perfectly_calibrated_model_has_ece_near_zero():
    rng = np.random.default_rng(0)
    n = 200_000
    conf = rng.uniform(0.5, 1.0, n)
    y = (rng.uniform(size=n) < conf).astype(int)  # class 1 is right with probability conf
    probs = np.stack([1 - conf, conf], 1)
    assert expected_calibration_error(probs, y) < 0.01


def test_ece_by_hand():
    # always 100 % sure, right half the time: ECE = |0.5 - 1.0| = 0.5
    y = np.array([0, 1, 0, 1])
    probs = np.array([[1.0, 0.0]] * 4)
    assert expected_calibration_error(probs, y) == pytest.approx(0.5)
    # two bins: conf .7 (2 right of 2) and conf .9 (1 of 2): ECE = .5*|1-.7| + .5*|.5-.9| = .35
    probs = np.array([[0.7, 0.3], [0.3, 0.7], [0.9, 0.1], [0.9, 0.1]])
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(0.35)


def test_temperature_scaling_recovers_the_overconfidence_factor():
    rng = np.random.default_rng(0)
    n, k = 20_000, 4
    z = rng.normal(0, 1.5, (n, k))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in true])
    over = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)  # the model's logits are 3x too large
    half = n // 2
    cal, scaled = calibration(over[half:], y[half:], val=(over[:half], y[:half]))
    assert cal["temperature"] == pytest.approx(3.0, rel=0.08)
    assert cal["ece"] > 0.1 and cal["ece_scaled"] < 0.02
    assert cal["nll_scaled"] < cal["nll"]
    assert (scaled.argmax(1) == over[half:].argmax(1)).all()  # scaling never changes a prediction


# ---------------------------------------------------------------------------------------------
# bias
def _group_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    group = np.where(np.arange(n) < n // 2, "F", "M")
    return y, group


def test_model_that_ignores_a_subgroup_shows_the_gap():
    y, sex = _group_data()
    pred = y.copy()
    pred[sex == "M"] = 0  # never finds the positive class in men
    probs = np.eye(2)[pred] * 0.9 + 0.05
    out, table = subgroup_audit(y, probs, ["normal", "lesion"], {"sex": sex, "site": np.full(len(y), "")},
                                   gap_threshold=0.1)
    s = out["attributes"]["sex"]
    assert s["groups"]["F"]["accuracy"] == 1.0 and s["groups"]["F"]["sensitivity"] == 1.0
    assert s["groups"]["M"]["sensitivity"] == 0.0 and s["groups"]["M"]["specificity"] == 1.0
    assert s["gaps"]["sensitivity"]["gap"] == pytest.approx(1.0)
    assert s["gaps"]["sensitivity"]["worst"] == "M"
    m_pos = (y[sex == "M"] == 1).mean()
    assert s["gaps"]["accuracy"]["gap"] == pytest.approx(m_pos)
    assert out["largest_gap"] == {**out["largest_gap"], "attribute": "sex", "metric": "sensitivity"}
    assert out["flagged"] and out["flagged_attributes"] == ["sex"]
    assert "site" in out["skipped"] and "site" not in out["attributes"]
    assert set(table["attribute"]) == {"sex"}


def test_fair_model_is_not_flagged_and_small_groups_leave_the_gap():
    y, sex = _group_data()
    pred = y.copy()
    flip = np.r_[np.arange(0, 10), np.arange(100, 110)]  # 10 errors in each group: same accuracy
    pred[flip] = 1 - pred[flip]
    age = np.where(np.arange(len(y)) < 195, "40-49", "80-89")
    pred[195:] = 1 - y[195:]  # the 5 oldest are all wrong, but too few to count
    probs = np.eye(2)[pred] * 0.9 + 0.05
    out, _ = subgroup_audit(y, probs, ["a", "b"], {"sex": sex, "age_band": age}, min_group_size=8,
                               gap_threshold=0.1, gap_metrics=["accuracy"])
    assert out["attributes"]["sex"]["gaps"]["accuracy"]["gap"] == pytest.approx(0.05)  # 90 vs 85 % right
    assert not out["attributes"]["sex"]["flagged"]
    ages = out["attributes"]["age_band"]
    assert ages["groups"]["80-89"]["accuracy"] == 0.0 and ages["groups"]["80-89"]["n"] == 5
    assert ages["eligible_groups"] == ["40-49"] and ages["gaps"] == {} and not ages["flagged"]
    assert not out["flagged"]


def test_flag_follows_the_threshold():
    y, sex = _group_data()
    pred = y.copy()
    pred[:20] = 1 - pred[:20]  # F: 80 % right, M: 100 %
    probs = np.eye(2)[pred] * 0.9 + 0.05
    strict, _ = subgroup_audit(y, probs, ["a", "b"], {"sex": sex}, gap_threshold=0.1, gap_metrics=["accuracy"])
    lax, _ = subgroup_audit(y, probs, ["a", "b"], {"sex": sex}, gap_threshold=0.25, gap_metrics=["accuracy"])
    assert strict["largest_gap"]["gap"] == pytest.approx(0.2)
    assert strict["flagged"] and not lax["flagged"]


# ---------------------------------------------------------------------------------------------
# interpretability
class MaskedHalves(nn.Module):
    """Class 0 = brightness of the left half, class 1 = of the right half (via a masked conv)."""

    def __init__(self, size=8):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        nn.init.constant_(self.conv.weight, 1.0)
        mask = torch.zeros(2, size, size)
        mask[0, :, : size // 2] = 1
        mask[1, :, size // 2:] = 1
        self.register_buffer("mask", mask)
        self.block = nn.Identity()

    def forward(self, x):
        a = self.block(self.conv(x) * self.mask)
        return a.mean((2, 3))


def test_gradcam_and_ig_point_at_the_evidence():
    torch.manual_seed(0)
    model = MaskedHalves().eval()
    x = torch.rand(6, 1, 8, 8) + 0.1
    target = torch.tensor([0, 1, 0, 1, 0, 1])
    gc, ig, delta = attribution_maps(model, x, target, model.block, ig_steps=8)
    for maps in (gc, ig):
        left, right = maps[..., :4].sum((1, 2)), maps[..., 4:].sum((1, 2))
        assert (left[target == 0] > 0).all() and np.allclose(right[target == 0], 0, atol=1e-6)
        assert (right[target == 1] > 0).all() and np.allclose(left[target == 1], 0, atol=1e-6)
    # the model is linear: IG is exact, attributions sum to f(x) - f(0)
    assert np.abs(delta).max() < 1e-4
    with torch.no_grad():
        assert ig[0].sum() == pytest.approx(float(model(x[:1])[0, 0]), rel=1e-4)


def test_randomization_check_tells_model_dependent_maps_from_model_independent_ones():
    torch.manual_seed(0)
    x = torch.ones(8, 1, 16, 16)
    target = torch.zeros(8, dtype=torch.long)
    # a linear model: IG = x * w, so with a constant image the map is the weights themselves
    linear = nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(256, 2)).eval()
    r = randomization_test(linear, x, target, layer_fn=lambda m: m[0], ig_steps=4, seed=1)
    assert abs(r["integrated_gradients"]) < 0.25
    # the mask, not the weights, decides where MaskedHalves looks: the maps survive randomization
    masked = MaskedHalves(16).eval()
    xr = torch.rand(8, 1, 16, 16)
    r = randomization_test(masked, xr, target, layer_fn=lambda m: m.block, ig_steps=4, seed=1)
    assert r["integrated_gradients"] > 0.9 and r["gradcam"] > 0.9
    # identical maps have similarity 1; the randomized copy shares no parameter value
    a = np.random.default_rng(0).random((3, 5, 5))
    assert rank_similarity(a, a) == pytest.approx(1.0)
    rnd = randomized_copy(linear, seed=1)
    assert not torch.equal(rnd[2].weight, linear[2].weight)


def test_examples_are_seeded_per_class_correct_and_wrong():
    y = np.repeat([0, 1, 2], 10)
    pred = y.copy()
    pred[[0, 1, 2, 10]] = 2  # class 0: 3 wrong, class 1: 1 wrong, class 2: none wrong
    ex = select_examples(y, pred, per_class=2, seed=5)
    assert ex == select_examples(y, pred, per_class=2, seed=5)
    counts = {(int(y[i]), c): 0 for i, c in ex}
    for i, c in ex:
        counts[(int(y[i]), c)] += 1
        assert (pred[i] == y[i]) == c
    assert counts == {(0, True): 2, (0, False): 2, (1, True): 2, (1, False): 1, (2, True): 2}


# ---------------------------------------------------------------------------------------------
# adversarial robustness
def _linear_problem(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d).astype(np.float32)
    x = rng.normal(size=(n, 1, 4, 4)).astype(np.float32)
    score = x.reshape(n, -1) @ w
    y = (score + rng.normal(0, 1.0, n) > 0).astype(int)  # some noise: not every clean image is right
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(np.stack([np.zeros(d, np.float32), w])))
        model[1].bias.zero_()
    return model.eval(), x, y, w, score


def test_fgsm_on_a_linear_model_matches_the_closed_form():
    model, x, y, w, score = _linear_problem()
    eps = [0.0, 0.05, 0.2, 0.5]
    rob = robustness(model, x, y, eps, clip_min=np.full((1, 1, 1), -100.0), clip_max=np.full((1, 1, 1), 100.0),
                        pgd_steps=10)
    clean = float(((score > 0) == y).mean())
    assert rob["clean_accuracy"] == pytest.approx(clean)
    assert rob["fgsm"][0] == pytest.approx(clean) and rob["pgd"][0] == pytest.approx(clean)  # eps 0: unchanged
    margin = np.where(y == 1, score, -score)  # > 0 when right; FGSM lowers it by eps * ||w||_1
    l1 = np.abs(w).sum()
    for e, acc_f, acc_p in zip(eps, rob["fgsm"], rob["pgd"]):
        assert acc_f == pytest.approx(float((margin > e * l1).mean()), abs=1 / len(y))
        assert acc_p == pytest.approx(acc_f, abs=1 / len(y))  # L-inf optimum of a linear model is FGSM's corner
    assert rob["fgsm"] == sorted(rob["fgsm"], reverse=True) and rob["fgsm"][-1] < 0.5 * clean
    lo, hi = rob["fgsm_ci"][1]
    assert lo < rob["fgsm"][1] < hi


def test_attacks_respect_the_image_range():
    """At a huge epsilon the clip range is the only limit: a model that needs values outside it
    cannot be fooled."""
    model, x, y, w, score = _linear_problem(n=50)
    x = np.clip(x, -1, 1)
    right = ((x.reshape(len(x), -1) @ w > 0) == y)
    rob = robustness(model, x[right], y[right], [0.0, 1000.0], np.full((1, 1, 1), -1.0), np.full((1, 1, 1), 1.0))
    # the worst case inside [-1, 1] is the corner -sign(w) (class 1) or +sign(w) (class 0): always wrong
    assert rob["clean_accuracy"] == 1.0 and rob["fgsm"][1] == 0.0
    rob = robustness(model, x[right], y[right], [1000.0], np.full((1, 1, 1), -1.0), np.full((1, 1, 1), 1.0))
    assert rob["epsilons"] == [1000.0]


def test_stratified_subsample():
    y = np.repeat([0, 1, 2], [50, 5, 20])
    idx = stratified_subsample(y, 12, seed=0)
    assert len(idx) == 12 and len(set(idx)) == 12 and (np.diff(idx) > 0).all()
    assert np.bincount(y[idx]).tolist() == [4, 4, 4]
    assert (stratified_subsample(y, 0) == np.arange(len(y))).all()


# ---------------------------------------------------------------------------------------------
# the stage, end to end on a tiny project
def make_split(path: Path, images: np.ndarray, labels: np.ndarray, classes, columns: dict, mean, std) -> None:
    import zarr
    from zarr.dtype import VariableLengthUTF8

    g = zarr.open_group(path, mode="w")
    n = len(labels)
    g.create_array("images", data=images.astype(np.uint8), chunks=(16,) + images.shape[1:])
    g.create_array("labels", data=labels.astype(np.int64), chunks=(n,))
    for col, values in columns.items():
        arr = g.create_array(col, shape=(n,), dtype=VariableLengthUTF8(), chunks=(n,))
        arr[:] = np.asarray(values, dtype=object)
    g.attrs.update({"classes": list(classes), "size": images.shape[-1], "channels": images.shape[1], "mode": "gray",
                    "mean": list(mean), "std": list(std)})


def square_images(labels: np.ndarray, size: int = 24, seed: int = 0) -> np.ndarray:
    """Class 0: a bright square on the left, class 1: on the right, on noise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (len(labels), 1, size, size))
    s = size // 4
    for i, c in enumerate(labels):
        r = rng.integers(1, size - s - 1)
        col = rng.integers(1, size // 2 - s) + (size // 2 if c else 0)
        x[i, 0, r:r + s, col:col + s] = 230
    return x.astype(np.uint8)


def make_tiny_project(root: Path, train_steps: int = 25) -> Path:
    """results/<project> with preprocess/{test,val}.zarr and train/model.pt of timm's tiny test_resnet
    trained briefly on the square task. Subgroups sex and site; age band is not carried. On the
    test split the men's images show no square: the model cannot see them (a subgroup it fails)."""
    classes = ["left", "right"]
    pre = root / "preprocess"
    pre.mkdir(parents=True)
    mean, std = [0.3], [0.3]
    rng = np.random.default_rng(0)
    for name, n in (("test", 48), ("val", 24)):
        y = np.tile([0, 1], n // 2)
        cols = {"patient": [f"P{i // 2}" for i in range(n)], "sex": np.where(np.arange(n) % 4 < 2, "F", "M"),
                "age_band": [""] * n, "site": rng.choice(["S1", "S2"], n)}
        x = square_images(y, seed=len(name))
        if name == "test":
            men = cols["sex"] == "M"
            x[men] = np.random.default_rng(1).integers(0, 60, x[men].shape)
        make_split(pre / f"{name}.zarr", x, y, classes, cols, mean, std)
    ytr = np.tile([0, 1], 16)
    model = train_briefly(square_images(ytr, seed=9), ytr, nn.functional.cross_entropy, 2, train_steps)
    save_model(root, model, classes, mean, std)
    return root


FAST = {"bootstrap": 200, "ig_steps": 4, "explain_per_class": 1, "randomization_samples": 4, "pgd_steps": 2,
        "attack_samples": 16, "epsilons": [0, 0.05, 0.5], "positive_label": "right"}


_TINY: dict = {}


def tiny_evaluated(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny project, evaluated once per test session (test_report.py builds its page on it)."""
    if not _TINY:
        root = make_tiny_project(tmp_path_factory.mktemp("tiny") / "proj")
        metrics = evaluate_all(root, {**section_defaults("evaluate"), **FAST}, "classification", seed=1)
        _TINY.update(root=root, metrics=metrics)
    return _TINY["root"], _TINY["metrics"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_evaluated(tmp_path_factory)


def test_stage_writes_every_output(tiny):
    root, m = tiny
    out = root / "evaluate"
    assert_every_figure(out)
    saved = json.loads((out / "metrics.json").read_text())  # strict JSON: no NaN
    assert saved["n"] == 48 and saved["classes"] == ["left", "right"]
    assert saved["ci"]["unit"] == "patient" and saved["ci"]["accuracy"][0] <= saved["accuracy"] <= saved["ci"]["accuracy"][1]
    assert saved["calibration"]["temperature"] > 0 and saved["calibration"]["ece_scaled"] is not None
    assert set(saved["subgroups"]["attributes"]) == {"sex", "site"} and "age_band" in saved["subgroups"]["skipped"]
    assert len(saved["explain"]["examples"]) >= 2
    rs = saved["explain"]["randomization_spearman"]
    assert -1 <= rs["gradcam"] <= 1 and -1 <= rs["integrated_gradients"] <= 1
    rob = saved["robustness"]
    assert rob["n"] == 16 and rob["fgsm"][0] == rob["pgd"][0] == rob["clean_accuracy"]
    assert rob["pgd"][-1] <= rob["fgsm"][-1] <= rob["fgsm"][0]
    assert saved["settings"]["positive_label"] == "right" and saved["positive_class"] == "right"
    assert (out / "subgroups.csv").read_text().startswith("attribute,group,metric,value")
    assert (out / "predictions.npz").is_file() and (out / "explain.npz").is_file()


def test_rule_names_every_figure_the_stage_draws():
    """The file names live in the rule only: it must hand the stage a path for every figure."""
    rule = (Path(__file__).resolve().parents[1] / "rules" / "evaluate.smk").read_text()
    for kind in ev.PLOT_KINDS:
        assert f"--plot {kind}={{output.{kind}:q}}" in rule, kind
    with pytest.raises(ValueError, match="unknown plot"):
        ev.Outputs(metrics="m.json", plots={"histogram": "h.png"})


def test_stage_model_learned_and_flat_metrics(tiny):
    _, m = tiny
    sex = m["subgroups"]["attributes"]["sex"]
    assert sex["groups"]["F"]["accuracy"] > 0.9  # the squares are easy: the model works where it can see them
    assert sex["groups"]["M"]["accuracy"] <= 0.75  # and fails the men, whose images show none
    assert sex["flagged"] and sex["largest_gap"]["worst"] == "M" and sex["largest_gap"]["gap"] >= 0.25
    flat = ev.flat_metrics(m)
    for key in ("test_accuracy", "test_accuracy_ci_low", "test_ece", "test_ece_scaled", "test_temperature",
                "test_fgsm_accuracy_eps_0.05", "test_pgd_accuracy_eps_0.5", "test_subgroup_gap_flag",
                "test_randomization_spearman_gradcam"):
        assert key in flat, key
    assert all(np.isfinite(v) for v in flat.values())
