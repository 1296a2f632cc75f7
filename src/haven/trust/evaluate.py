"""Evaluate: the trained model on the held-out test split (patients never seen in training).

Five questions a model must answer before anyone ships it, each an output of the DAG:

performance
    accuracy, balanced accuracy, per-class sensitivity/specificity, ROC AUC (one-vs-rest,
    macro, for more than two classes), PR AUC (average precision), confusion matrix; 95 %
    confidence intervals from a *patient-level* (cluster) bootstrap, vectorized: slices of one
    patient are correlated, so patients, not images, are resampled.
calibration
    expected calibration error (top-label, equal-width bins), Brier score, NLL, a reliability
    diagram; optionally temperature scaling fitted on the validation split (it changes the
    probabilities, never the predicted class).
bias
    the same metrics per subgroup of every coarse attribute the data carries through
    anonymization (sex, age band, site), computed with fairlearn's ``MetricFrame``; per metric
    the largest gap between groups with at least ``min_group_size`` images, and a flag when
    a gap exceeds ``gap_threshold``.
interpretability
    Grad-CAM (last stage of the backbone) and Integrated Gradients (captum) overlays for a
    seeded sample of correct and wrong test images per class, and the model-randomization
    sanity check (Adebayo et al. 2018): the mean Spearman rank correlation between the absolute
    maps of the trained model and of the same architecture with re-initialized weights. Near 0 means
    the maps depend on what the model learned; near 1 means they would look the same for any
    network (an edge detector, not an explanation).
adversarial robustness
    accuracy under FGSM and PGD (L-inf, the Adversarial Robustness Toolbox, ART) on a seeded,
    class-stratified subsample, at ``epsilons`` in *normalized* pixel units: the attack
    perturbs the network input ``(x/255 - mean) / std`` directly and keeps it inside the
    image range ``[(0 - mean)/std, (1 - mean)/std]`` per channel. An epsilon of ``e`` is
    ``e * std`` of the [0, 1] intensity range (``epsilon_pixel`` in ``metrics.json``).

Writes into the output folder ``metrics.json``, ``predictions.npz``, ``explain.npz`` (the maps),
``subgroups.csv`` (every subgroup metric) and the
plots ``confusion.png``, ``roc.png``, ``pr.png``, ``reliability.png``, ``subgroups.png``,
``gradcam.png``, ``integrated_gradients.png``, ``robustness.png``; everything is logged to the
project's train run in MLflow.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from haven.io import atomic_write_text

log = logging.getLogger(__name__)

# The schema's defaults (workflow/schemas/config.schema.yaml, `evaluate:`), for direct calls.
DEFAULTS: dict = {
    "positive_label": None,
    "bootstrap": 500,
    "ci_level": 0.95,
    "calibration_bins": 15,
    "temperature_scaling": True,
    "subgroups": ["sex", "age_band", "site"],
    "min_group_size": 8,
    "gap_threshold": 0.1,
    "gap_metrics": ["accuracy", "balanced_accuracy", "sensitivity", "specificity"],
    "explain_per_class": 2,
    "ig_steps": 16,
    "gradcam_stage": -1,
    "randomization_samples": 8,
    "epsilons": [0.0, 0.01, 0.03, 0.1],
    "pgd_steps": 10,
    "attack_samples": 64,
    "threads": 1,
}

PLOTS = ("confusion.png", "roc.png", "pr.png", "reliability.png", "subgroups.png", "gradcam.png",
         "integrated_gradients.png", "robustness.png")


def with_defaults(settings: dict | None) -> dict:
    s = copy.deepcopy(DEFAULTS)
    s.update({k: v for k, v in (settings or {}).items() if v is not None or k == "positive_label"})
    return s


def positive_index(classes: list[str], positive_label: str | None) -> int:
    """The class treated as positive for binary sensitivity/specificity and PR: ``positive_label``
    or, when unset, the second class (the one whose probability the binary ROC uses)."""
    if positive_label is not None:
        if positive_label not in classes:
            raise ValueError(f"evaluate.positive_label {positive_label!r} is not a class ({', '.join(classes)})")
        return classes.index(positive_label)
    return 1 if len(classes) > 1 else 0


# ---------------------------------------------------------------------------------------------
# performance
def compute_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], positive: int | None = None) -> dict:
    from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score,
                                 confusion_matrix, roc_auc_score)

    pred = probs.argmax(1)
    k = len(classes)
    pos = positive_index(classes, None) if positive is None else positive
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "n": int(len(y)),
            "accuracy": float(accuracy_score(y, pred)) if len(y) else None,
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else None,
            "confusion_matrix": cm.tolist(),
            "classes": classes,
        }
    per_class = {}
    for i, name in enumerate(classes):
        tp, fn = cm[i, i], cm[i].sum() - cm[i, i]
        fp, tn = cm[:, i].sum() - cm[i, i], cm.sum() - cm[i].sum() - cm[:, i].sum() + cm[i, i]
        per_class[name] = {"sensitivity": float(tp / (tp + fn)) if tp + fn else None,
                           "specificity": float(tn / (tn + fp)) if tn + fp else None}
    out["per_class"] = per_class
    present = np.unique(y)
    out["roc_auc"] = out["pr_auc"] = None
    try:
        if k == 2 and len(present) == 2:
            out["roc_auc"] = float(roc_auc_score(y, probs[:, 1]))
            out["pr_auc"] = float(average_precision_score(y == pos, probs[:, pos]))
        elif k > 2 and len(present) == k:
            out["roc_auc"] = float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
            out["pr_auc"] = float(average_precision_score(np.eye(k)[y], probs, average="macro"))
    except ValueError:
        pass
    if k == 2:
        out["positive_class"] = classes[pos]
    return out


def _group_columns(scores: np.ndarray, descending: bool) -> tuple[np.ndarray, int]:
    """Rank of each sample's score among the unique scores (ties share a group)."""
    uniq, inv = np.unique(-scores if descending else scores, return_inverse=True)
    return inv, len(uniq)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of ``weights`` (B, n): the bootstrap replicate counts of each sample.

    Equals ``roc_auc_score(positive, scores, sample_weight=w)``: AUC = P(score_pos > score_neg)
    + P(tie) / 2 over weighted (positive, negative) pairs. NaN where a class has no weight.
    """
    inv, g = _group_columns(scores, descending=False)
    onehot = np.zeros((len(scores), g))
    onehot[np.arange(len(scores)), inv] = 1.0
    pw = (weights * positive) @ onehot          # (B, G) positive weight per score level, ascending
    nw = (weights * ~positive) @ onehot
    below = np.cumsum(nw, axis=1) - nw          # negative weight strictly below each level
    num = (pw * (below + 0.5 * nw)).sum(1)
    den = pw.sum(1) * nw.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_average_precision(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision per row of ``weights``, as ``average_precision_score(..., sample_weight=w)``:
    sum over thresholds (unique scores, descending) of recall increment times precision."""
    inv, g = _group_columns(scores, descending=True)
    onehot = np.zeros((len(scores), g))
    onehot[np.arange(len(scores)), inv] = 1.0
    pw = (weights * positive) @ onehot
    nw = (weights * ~positive) @ onehot
    tp, fp = np.cumsum(pw, 1), np.cumsum(nw, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        total = pw.sum(1)
        return np.where(total > 0, (pw * precision).sum(1) / total, np.nan)


def bootstrap_weights(n: int, n_resamples: int, clusters: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """(B, n) replicate counts: how often each sample is drawn in each bootstrap resample.

    With ``clusters`` (e.g. patient ids) whole clusters are resampled and every sample of a
    drawn cluster counts once per draw (cluster bootstrap)."""
    rng = np.random.default_rng(seed)
    if clusters is None or len(np.unique(clusters)) == n:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)
    uniq, inv = np.unique(clusters, return_inverse=True)
    m = len(uniq)
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n_resamples).astype(np.float64)
    return counts[:, inv]


def replicate_metrics(y: np.ndarray, probs: np.ndarray, weights: np.ndarray, positive: int) -> dict[str, np.ndarray]:
    """Every metric of :func:`compute_metrics` for each weight row, vectorized: (B,) arrays."""
    n, k = probs.shape
    pred = probs.argmax(1)
    cell = np.zeros((n, k * k))
    cell[np.arange(n), y * k + pred] = 1.0
    cm = (weights @ cell).reshape(-1, k, k)       # (B, true, pred)
    total = cm.sum((1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    rows, cols = cm.sum(2), cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(rows > 0, tp / rows, np.nan)
        tn = total[:, None] - rows - cols + tp
        neg = total[:, None] - rows
        spec = np.where(neg > 0, tn / neg, np.nan)
        out = {"accuracy": tp.sum(1) / total}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out["balanced_accuracy"] = np.nanmean(sens, axis=1)
    for i in range(k):
        out[f"sensitivity/{i}"] = sens[:, i]
        out[f"specificity/{i}"] = spec[:, i]
    if k == 2:
        out["roc_auc"] = weighted_auc(probs[:, 1], y == 1, weights)
        out["pr_auc"] = weighted_average_precision(probs[:, positive], y == positive, weights)
    else:
        auc = np.stack([weighted_auc(probs[:, i], y == i, weights) for i in range(k)], 1)
        ap = np.stack([weighted_average_precision(probs[:, i], y == i, weights) for i in range(k)], 1)
        out["roc_auc"] = auc.mean(1)  # NaN when a class is missing from the resample, like sklearn
        out["pr_auc"] = ap.mean(1)
    return out


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, classes: list[str], n_resamples: int = 500,
                 level: float = 0.95, clusters: np.ndarray | None = None, seed: int = 0,
                 positive: int | None = None) -> dict:
    """Percentile bootstrap confidence intervals ``[low, high]`` for every metric.

    ``{"accuracy": [lo, hi], "balanced_accuracy": ..., "roc_auc": ..., "pr_auc": ...,
    "per_class": {class: {"sensitivity": [lo, hi], "specificity": [lo, hi]}}, "resamples": B,
    "level": level, "unit": "patient" | "image"}``; an interval is None when fewer than
    half of the resamples define the metric.
    """
    pos = positive_index(classes, None) if positive is None else positive
    w = bootstrap_weights(len(y), n_resamples, clusters, seed)
    reps = replicate_metrics(np.asarray(y), np.asarray(probs), w, pos)
    a = (1 - level) / 2

    def ci(v: np.ndarray) -> list[float] | None:
        v = v[np.isfinite(v)]
        if len(v) < max(1, n_resamples // 2):
            return None
        lo, hi = np.percentile(v, [100 * a, 100 * (1 - a)])
        return [float(lo), float(hi)]

    out = {name: ci(reps[name]) for name in ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc")}
    out["per_class"] = {c: {"sensitivity": ci(reps[f"sensitivity/{i}"]),
                            "specificity": ci(reps[f"specificity/{i}"])} for i, c in enumerate(classes)}
    unit = "patient" if clusters is not None and len(np.unique(clusters)) < len(y) else "image"
    out.update(resamples=int(n_resamples), level=float(level), unit=unit)
    return out


# ---------------------------------------------------------------------------------------------
# calibration
def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict:
    """Top-label confidence vs accuracy in ``bins`` equal-width bins over [0, 1]."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # (lo, hi] bins, 0 in the first
    count = np.bincount(idx, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1), "count": count, "accuracy": acc, "confidence": mean_conf}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE = sum over bins of (bin size / n) * |accuracy(bin) - mean confidence(bin)|."""
    if len(y) == 0:
        return float("nan")
    r = reliability_bins(probs, y, bins)
    filled = r["count"] > 0
    return float((r["count"][filled] / len(y) * np.abs(r["accuracy"][filled] - r["confidence"][filled])).sum())


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    return float(((probs - np.eye(probs.shape[1])[y]) ** 2).sum(1).mean())


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def scale_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from probabilities: log p differs from the logits by a per-row constant."""
    z = np.log(np.clip(probs, 1e-12, None)) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T in [0.05, 20] that minimizes the NLL of ``softmax(logits / T)`` on ``y``."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda t: nll(scale_temperature(probs, float(np.exp(t))), y),
                          bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def calibration(probs: np.ndarray, y: np.ndarray, bins: int = 15, val: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[dict, np.ndarray | None]:
    """Calibration of the test probabilities; with ``val`` = (probs, labels) also after temperature
    scaling fitted there. Returns (summary, test probabilities after scaling or None)."""
    out = {"bins": int(bins), "ece": expected_calibration_error(probs, y, bins), "brier": brier(probs, y),
           "nll": nll(probs, y), "temperature": None}
    scaled = None
    if val is not None and len(val[1]) > 0:
        t = fit_temperature(*val)
        scaled = scale_temperature(probs, t)
        out.update(temperature=t, fitted_on="val", val_n=int(len(val[1])),
                   ece_scaled=expected_calibration_error(scaled, y, bins), brier_scaled=brier(scaled, y),
                   nll_scaled=nll(scaled, y))
    return out, scaled


# ---------------------------------------------------------------------------------------------
# bias
def _nan_if_error(f):
    def g(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(f(*args, **kwargs))
        except ValueError:
            return float("nan")
    g.__name__ = f.__name__
    return g


def subgroup_metric_functions(classes: list[str], positive: int) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score

    k = len(classes)

    def count(y_true, y_pred):
        return len(y_true)

    def auc(y_true, y_pred, probs):
        p = np.stack(list(probs))
        if len(np.unique(y_true)) < (2 if k == 2 else k):
            return float("nan")
        return roc_auc_score(y_true, p[:, 1]) if k == 2 else roc_auc_score(
            y_true, p, multi_class="ovr", average="macro", labels=list(range(k)))

    fns = {"n": count, "accuracy": _nan_if_error(accuracy_score),
           "balanced_accuracy": _nan_if_error(balanced_accuracy_score)}
    if k == 2:
        def sensitivity(y_true, y_pred):
            return recall_score(y_true, y_pred, pos_label=positive, labels=[0, 1], zero_division=np.nan)

        def specificity(y_true, y_pred):
            return recall_score(y_true, y_pred, pos_label=1 - positive, labels=[0, 1], zero_division=np.nan)

        fns["sensitivity"] = _nan_if_error(sensitivity)
        fns["specificity"] = _nan_if_error(specificity)
    fns["roc_auc"] = _nan_if_error(auc)
    return fns


def subgroup_audit(y: np.ndarray, probs: np.ndarray, classes: list[str], attributes: dict[str, np.ndarray],
                   min_group_size: int = 8, gap_threshold: float = 0.1,
                   gap_metrics: list[str] | tuple[str, ...] = ("accuracy", "balanced_accuracy", "sensitivity",
                                                               "specificity"),
                   positive: int | None = None) -> tuple[dict, "pd.DataFrame"]:  # noqa: F821
    """The test metrics per subgroup of each attribute (fairlearn ``MetricFrame``), the largest gap
    per metric between groups of at least ``min_group_size`` images, and a flag when a gap
    exceeds ``gap_threshold``. Missing values ('' ) form the group ``unknown``; an attribute
    with no known value, or only one group, is listed under ``skipped`` with the reason.

    Returns (summary for metrics.json, long table attribute/group/metric/value).
    """
    import pandas as pd
    from fairlearn.metrics import MetricFrame

    pos = positive_index(classes, None) if positive is None else positive
    y = np.asarray(y)
    pred = probs.argmax(1)
    fns = subgroup_metric_functions(classes, pos)
    prob_rows = np.empty(len(y), dtype=object)
    prob_rows[:] = list(probs)
    out: dict = {"threshold": float(gap_threshold), "min_group_size": int(min_group_size),
                 "positive_class": classes[pos] if len(classes) == 2 else None,
                 "gap_metrics": [m for m in gap_metrics if m in fns], "attributes": {}, "skipped": {},
                 "largest_gap": None, "flagged": False}
    rows = []
    for attr, values in attributes.items():
        values = np.array(["unknown" if str(v).strip() in ("", "nan", "None") else str(v) for v in values])
        if len(values) != len(y) or (values == "unknown").all():
            out["skipped"][attr] = "not carried by this project's data (no known value on the test split)"
            continue
        if len(np.unique(values)) < 2:
            out["skipped"][attr] = f"a single group on the test split ({values[0]})"
            continue
        mf = MetricFrame(metrics=fns, y_true=y, y_pred=pred, sensitive_features={attr: values},
                         sample_params={"roc_auc": {"probs": prob_rows}})
        by = mf.by_group
        groups = {}
        for g, r in by.iterrows():
            groups[str(g)] = {m: (None if pd.isna(v) else (int(v) if m == "n" else float(v))) for m, v in r.items()}
            for m, v in r.items():
                rows.append({"attribute": attr, "group": str(g), "metric": m, "value": v})
        eligible = by[(by["n"] >= min_group_size) & (by.index != "unknown")]
        gaps = {}
        for m in out["gap_metrics"]:
            col = eligible[m].dropna() if m in eligible else pd.Series(dtype=float)
            if len(col) < 2:
                continue
            gaps[m] = {"gap": float(col.max() - col.min()), "best": str(col.idxmax()), "worst": str(col.idxmin()),
                       "best_value": float(col.max()), "worst_value": float(col.min())}
        largest = max(gaps.items(), key=lambda kv: kv[1]["gap"], default=None)
        entry = {"groups": groups, "overall": {m: (None if pd.isna(v) else float(v)) for m, v in mf.overall.items()},
                 "eligible_groups": [str(g) for g in eligible.index], "gaps": gaps,
                 "largest_gap": ({"metric": largest[0], **largest[1]} if largest else None),
                 "flagged": bool(largest and largest[1]["gap"] > gap_threshold)}
        out["attributes"][attr] = entry
        if largest and (out["largest_gap"] is None or largest[1]["gap"] > out["largest_gap"]["gap"]):
            out["largest_gap"] = {"attribute": attr, "metric": largest[0], **largest[1]}
        out["flagged"] = out["flagged"] or entry["flagged"]
    out["flagged_attributes"] = [a for a, e in out["attributes"].items() if e["flagged"]]
    return out, pd.DataFrame(rows, columns=["attribute", "group", "metric", "value"])


# ---------------------------------------------------------------------------------------------
# interpretability
def gradcam_layer(model, stage: int = -1):
    """The backbone stage Grad-CAM hooks (default the last one, the last conv block)."""
    from haven.learn.models import backbone_stages

    return backbone_stages(model)[stage]


def attribution_maps(model, x, target, layer, ig_steps: int = 16, baseline=None, batch: int = 16):
    """(Grad-CAM maps (N, H, W), signed, upsampled to the input; Integrated Gradients maps (N, H, W),
    summed |attribution| over channels; IG convergence deltas (N,)).

    Grad-CAM is taken at ``layer`` for class ``target``; IG integrates from ``baseline``
    (default: a black image in the model's normalized units is the caller's job; zeros here).
    """
    import torch
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    model.eval()
    target = torch.as_tensor(target, dtype=torch.long)
    if baseline is None:
        baseline = torch.zeros_like(x[:1])
    gc, ig, delta = [], [], []
    for i in range(0, len(x), batch):
        xb, tb = x[i:i + batch], target[i:i + batch]
        cam = LayerGradCam(model, layer).attribute(xb, target=tb, relu_attributions=False)
        cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        gc.append(cam[:, 0].detach())
        a, d = IntegratedGradients(model).attribute(
            xb, baselines=baseline.expand_as(xb), target=tb, n_steps=ig_steps, internal_batch_size=64,
            return_convergence_delta=True)
        ig.append(a.detach().abs().sum(1))
        delta.append(d.detach())
    cat = (lambda v: torch.cat(v).cpu().numpy()) if gc else (lambda v: np.zeros((0,) + tuple(x.shape[-2:])))
    return cat(gc), cat(ig), (torch.cat(delta).cpu().numpy() if delta else np.zeros(0))


def randomized_copy(model, seed: int = 0):
    """The same architecture with every parameter and BatchNorm statistic re-initialized."""
    import torch

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
    return clone.eval()


def rank_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman correlation of paired maps (N, H, W); maps constant in either are left out."""
    from scipy.stats import spearmanr

    rhos = []
    for u, v in zip(a, b):
        u, v = u.ravel(), v.ravel()
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            continue
        rhos.append(spearmanr(u, v).statistic)
    return float(np.mean(rhos)) if rhos else float("nan")


def randomization_test(model, x, target, layer_fn=None, ig_steps: int = 16, baseline=None, seed: int = 0,
                       maps: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Model-randomization sanity check (Adebayo et al. 2018): Spearman correlation between the
    absolute maps of ``model`` and of :func:`randomized_copy` for the same images and targets (per
    method, mean over images; absolute values, so a map that only flips sign counts as unchanged).
    ``layer_fn(model)`` gives the Grad-CAM layer (default: the last backbone stage); ``maps`` =
    (Grad-CAM, IG) of ``model`` when already computed."""
    layer_fn = layer_fn or gradcam_layer
    if maps is None:
        gc, ig, _ = attribution_maps(model, x, target, layer_fn(model), ig_steps, baseline)
    else:
        gc, ig = maps
    rnd = randomized_copy(model, seed)
    gc_r, ig_r, _ = attribution_maps(rnd, x, target, layer_fn(rnd), ig_steps, baseline)
    return {"gradcam": rank_similarity(np.abs(gc), np.abs(gc_r)),
            "integrated_gradients": rank_similarity(np.abs(ig), np.abs(ig_r)),
            "n": int(len(x)), "randomization": "all weights and BatchNorm statistics re-initialized"}


def select_examples(y: np.ndarray, pred: np.ndarray, per_class: int, seed: int = 0) -> list[tuple[int, bool]]:
    """Seeded sample per true class: up to ``per_class`` correct and ``per_class`` wrong images,
    as (index, correct) in class order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        for correct in (True, False):
            idx = np.flatnonzero((y == c) & ((pred == y) == correct))
            for i in sorted(rng.permutation(idx)[:per_class]):
                chosen.append((int(i), correct))
    return chosen


# ---------------------------------------------------------------------------------------------
# adversarial robustness
def stratified_subsample(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` indices, classes taken in turn from seeded permutations (sorted)."""
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    out: list[int] = []
    while len(out) < n:
        for p in pools:
            if p and len(out) < n:
                out.append(int(p.pop()))
    return np.sort(np.array(out))


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score interval of a proportion k / n."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [float(max(0.0, c - h)), float(min(1.0, c + h))]


def robustness(model, x: np.ndarray, y: np.ndarray, epsilons: list[float], clip_min, clip_max,
               pgd_steps: int = 10, batch_size: int = 64) -> dict:
    """Accuracy under untargeted L-inf FGSM and PGD (ART) for each epsilon, in the units of ``x``.

    ``x`` is the network input (N, C, H, W) float32; ``clip_min``/``clip_max`` bound every
    feature (arrays broadcastable to one sample, e.g. (C, 1, 1)). PGD: ``pgd_steps`` steps of
    2.5 * eps / steps from the clean image (no random start), projected onto the eps-ball and
    the clip range; at eps = 0 the ball is a point and PGD runs a single (null) step.

    Robust accuracy counts an image as robust at eps when the attack did not change its
    prediction away from the true label. As in AutoAttack, only images still robust are attacked:
    misclassified clean images count as broken at every eps, and an image broken at a smaller
    eps is broken at every larger one (its adversarial example lies inside the larger ball), so
    epsilons are attacked in increasing order and the curve is monotone. Wilson 95 % intervals.
    """
    import torch
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.WARNING)  # its per-attack "success rate" is not ours
    dev = next(model.parameters()).device
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    clf = PyTorchClassifier(model=model.eval(), loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=int(model_classes(model, x)),
                            clip_values=(np.asarray(clip_min, np.float32), np.asarray(clip_max, np.float32)),
                            device_type="gpu" if dev.type == "cuda" else "cpu")
    clean = clf.predict(x, batch_size=batch_size).argmax(1) == y if len(y) else np.zeros(0, bool)
    order = sorted(range(len(epsilons)), key=lambda i: float(epsilons[i]))
    out = {"n": int(len(y)), "clean_accuracy": float(clean.mean()) if len(y) else None,
           "epsilons": [float(e) for e in epsilons], "pgd_steps": int(pgd_steps)}
    for attack in ("fgsm", "pgd"):
        robust = clean.copy()
        acc: list[float | None] = [None] * len(epsilons)
        ci: list = [None] * len(epsilons)
        for i in order:
            eps = float(epsilons[i])
            todo = np.flatnonzero(robust)
            if len(todo):
                if attack == "fgsm":
                    atk = FastGradientMethod(clf, norm=np.inf, eps=eps, eps_step=max(eps, 1e-6), batch_size=batch_size)
                else:
                    atk = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=max(2.5 * eps / pgd_steps, 1e-6),
                                                   max_iter=pgd_steps if eps > 0 else 1, num_random_init=0,
                                                   batch_size=batch_size, verbose=False)
                adv = atk.generate(x[todo], y=y[todo])
                robust[todo] = clf.predict(adv, batch_size=batch_size).argmax(1) == y[todo]
            acc[i] = float(robust.mean()) if len(y) else None
            ci[i] = wilson(int(robust.sum()), len(y))
        out[attack], out[f"{attack}_ci"] = acc, ci
    return out


def model_classes(model, x) -> int:
    import torch

    with torch.no_grad():
        dev = next(model.parameters()).device
        return int(model(torch.as_tensor(np.asarray(x[:1], np.float32), device=dev)).shape[1])


# ---------------------------------------------------------------------------------------------
# plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _plt()
    from sklearn.metrics import ConfusionMatrixDisplay

    disp = ConfusionMatrixDisplay(np.asarray(cm), display_labels=classes)
    disp.plot(colorbar=False)
    disp.figure_.set_size_inches(max(4, 0.5 * len(classes) + 2), max(4, 0.5 * len(classes) + 2))
    disp.ax_.set_title("Confusion matrix (test split)")
    disp.figure_.tight_layout()
    disp.figure_.savefig(path, dpi=100)
    plt.close(disp.figure_)


def _one_vs_rest(classes: list[str], positive: int) -> list[int]:
    return [positive] if len(classes) == 2 else list(range(len(classes)))


def plot_roc(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, positive: int = 1) -> None:
    plt = _plt()
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5, 5))
    targets = _one_vs_rest(classes, positive)
    for i in targets:
        if 0 < (y == i).sum() < len(y):
            RocCurveDisplay.from_predictions(y == i, probs[:, i], name=f"{classes[i]} vs rest", ax=ax,
                                             plot_chance_level=(i == targets[0]))
    ax.set_title("ROC (test split)")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, positive: int = 1) -> None:
    plt = _plt()
    from sklearn.metrics import PrecisionRecallDisplay

    fig, ax = plt.subplots(figsize=(5, 5))
    for i in _one_vs_rest(classes, positive):
        if 0 < (y == i).sum() < len(y):
            PrecisionRecallDisplay.from_predictions(y == i, probs[:, i], name=f"{classes[i]} vs rest", ax=ax)
    ax.set_title("Precision-recall (test split)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(probs: np.ndarray, y: np.ndarray, path: Path, bins: int = 15,
                     scaled: np.ndarray | None = None, temperature: float | None = None) -> None:
    plt = _plt()
    panels = [("uncalibrated", probs)] + ([(f"temperature scaled (T = {temperature:.2f})", scaled)]
                                          if scaled is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, p) in zip(axes[0], panels):
        r = reliability_bins(p, y, bins)
        centers = (r["edges"][:-1] + r["edges"][1:]) / 2
        filled = r["count"] > 0
        width = 1.0 / bins
        ax.bar(centers[filled], r["accuracy"][filled], width=width, edgecolor="k", alpha=0.7, label="accuracy")
        ax.bar(centers[filled], (r["confidence"] - r["accuracy"])[filled], bottom=r["accuracy"][filled], width=width,
               color="tab:red", alpha=0.3, hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}\nECE = {expected_calibration_error(p, y, bins):.3f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability diagram (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_subgroups(audit: dict, path: Path) -> None:
    plt = _plt()
    attrs = audit["attributes"]
    if not attrs:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        reasons = "\n".join(f"{a}: {r}" for a, r in audit["skipped"].items()) or "no attributes configured"
        ax.text(0.5, 0.5, f"Subgroup audit: no attribute to audit\n{reasons}", ha="center", va="center", fontsize=9)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    metrics = [m for m in audit["gap_metrics"]]
    fig, axes = plt.subplots(1, len(attrs), figsize=(max(4.5, 1.1 * max(len(e["groups"]) for e in attrs.values())
                                                         * len(metrics) / 2.5) * len(attrs) / max(1, len(attrs) / 2),
                                                     4.2), squeeze=False)
    for ax, (attr, e) in zip(axes[0], attrs.items()):
        groups = list(e["groups"])
        width = 0.8 / max(1, len(metrics))
        for j, m in enumerate(metrics):
            vals = [e["groups"][g].get(m) for g in groups]
            xs = np.arange(len(groups)) + (j - (len(metrics) - 1) / 2) * width
            label = f"{m} ({audit['positive_class']})" if m in ("sensitivity", "specificity") and \
                audit.get("positive_class") else m
            bars = ax.bar(xs, [np.nan if v is None else v for v in vals], width=width, label=label)
            for b, g, v in zip(bars, groups, vals):
                ax.text(b.get_x() + b.get_width() / 2, (v or 0) + 0.01, "n/a" if v is None else f"{v:.2f}",
                        ha="center", va="bottom", fontsize=5, rotation=90)
                if g not in e["eligible_groups"]:
                    b.set_alpha(0.35)
                    b.set_hatch("..")
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels([f"{g}\nn={e['groups'][g]['n']}" for g in groups], fontsize=7)
        ax.set_ylim(0, 1.15)
        lg = e["largest_gap"]
        flag = " FLAGGED" if e["flagged"] else ""
        ax.set_title(f"{attr}: largest gap {lg['gap']:.2f} ({lg['metric']}){flag}" if lg else f"{attr}: no gap",
                     fontsize=9, color="tab:red" if e["flagged"] else "black")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Subgroup audit (faded: n < {audit['min_group_size']}, not in the gap; "
                 f"threshold {audit['threshold']:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _display_image(img: np.ndarray, mode: str | None) -> tuple[np.ndarray, str | None]:
    """uint8 (C, H, W) → something imshow shows: RGB for rgb data, else the first channel."""
    if img.shape[0] == 3 and mode == "rgb":
        return np.transpose(img, (1, 2, 0)), None
    return img[0], "gray"


def plot_attributions(images: np.ndarray, maps: np.ndarray, examples: list[tuple[int, bool]], y: np.ndarray,
                      pred: np.ndarray, classes: list[str], title: str, path: Path, per_class: int,
                      mode: str | None = None, signed: bool = False) -> None:
    """One row per class, ``per_class`` correct then ``per_class`` wrong examples as overlays."""
    plt = _plt()
    rows = [c for c in range(len(classes)) if (y == c).any()]
    cols = 2 * per_class
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.7 * cols, 2.0 * len(rows) + 0.7), squeeze=False,
                             layout="constrained")
    pos = {c: {True: [], False: []} for c in rows}
    for j, (i, correct) in enumerate(examples):
        pos[int(y[i])][correct].append(j)
    for r, c in enumerate(rows):
        slots = pos[c][True][:per_class] + [None] * (per_class - len(pos[c][True][:per_class])) + \
            pos[c][False][:per_class] + [None] * (per_class - len(pos[c][False][:per_class]))
        for k, (ax, j) in enumerate(zip(axes[r], slots)):
            ax.set_xticks([])
            ax.set_yticks([])
            if j is None:
                ax.text(0.5, 0.5, "none correct" if k < per_class else "none wrong", ha="center", va="center",
                        fontsize=6, transform=ax.transAxes)
                for s in ax.spines.values():
                    s.set_visible(False)
                continue
            i = examples[j][0]
            shown, cmap = _display_image(images[j], mode)
            ax.imshow(shown, cmap=cmap)
            m = maps[j]
            if signed:
                m = np.maximum(m, 0)  # Grad-CAM: positive evidence for the explained class
            scale = (m.max() if signed else np.percentile(m, 99.5)) if m.max() > 0 else 1.0
            m = np.clip(m / (scale or 1.0), 0, 1)
            rgba = plt.get_cmap("jet")(m)
            rgba[..., 3] = 0.7 * m  # transparent where the map is 0: the image stays readable
            ax.imshow(rgba)
            ok = pred[i] == y[i]
            ax.set_title(f"✓ {classes[y[i]]}" if ok else f"✗ {classes[y[i]]}\n→ {classes[pred[i]]}",
                         fontsize=7, color="black" if ok else "tab:red")
        axes[r][0].set_ylabel(classes[c], fontsize=8)
    fig.suptitle(f"{title}: {per_class} correct | {per_class} wrong per class\n(explaining the predicted class)",
                 fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_robustness(rob: dict, path: Path, pixel_scale: float | None = None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    eps = rob["epsilons"]
    for attack, marker, label in (("fgsm", "o", "FGSM"), ("pgd", "s", f"PGD ({rob['pgd_steps']} steps)")):
        acc = np.array(rob[attack], dtype=float)
        ci = rob.get(f"{attack}_ci") or [None] * len(eps)
        lo = np.array([acc[i] - c[0] if c else 0 for i, c in enumerate(ci)])
        hi = np.array([c[1] - acc[i] if c else 0 for i, c in enumerate(ci)])
        ax.errorbar(eps, acc, yerr=[lo, hi], marker=marker, capsize=3, label=label)
    if rob.get("chance") is not None:
        ax.axhline(rob["chance"], color="grey", ls=":", label="chance (majority class)")
    ax.set_xlabel("epsilon (L-inf, normalized pixel units)")
    ax.set_ylabel(f"accuracy (n = {rob['n']})")
    ax.set_ylim(0, 1.02)
    if pixel_scale:
        sec = ax.secondary_xaxis("top", functions=(lambda e: e * pixel_scale * 255, lambda v: v / pixel_scale / 255))
        sec.set_xlabel("epsilon in 8-bit grey levels (x std x 255)", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("Adversarial robustness (test subsample)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the stage
def _module_name(model, layer) -> str:
    from haven.learn.models import unwrap

    name = next((n for n, m in unwrap(model).named_modules() if m is layer), type(layer).__name__)
    return f"{name} ({type(layer).__name__})"


def _column(split, name: str) -> np.ndarray:
    """A per-sample string column of a split ('' where the data carried no value)."""
    if name not in split.group:
        return np.full(len(split), "", dtype=object)
    return np.array([str(v) for v in split.group[name][:].tolist()], dtype=object)


def _read(split, idx: np.ndarray) -> np.ndarray:
    if len(idx) == 0:
        return np.zeros((0,) + tuple(split.images.shape[1:]), np.uint8)
    return np.stack([np.asarray(split.images[int(i)]) for i in idx])


def evaluate(model_path: str | Path, preprocess_dir: str | Path, out_dir: str | Path,
             tracking: dict | None = None, settings: dict | None = None, seed: int = 42) -> dict:
    """The evaluate stage: see the module docstring. ``settings`` is the project's ``evaluate``
    config section (defaults from :data:`DEFAULTS`)."""
    import torch

    from haven.learn.train import ZarrSplit, load_model, normalize, predict

    s = with_defaults(settings)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()

    torch.set_num_threads(int(s["threads"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre = Path(preprocess_dir)
    model, meta = load_model(model_path)
    model.requires_grad_(False)  # attributions and attacks need input gradients only
    classes = list(meta["classes"])
    pos = positive_index(classes, s["positive_label"])
    test = ZarrSplit(pre / "test.zarr")
    if len(test) == 0:
        raise ValueError(f"{pre / 'test.zarr'} holds no image: nothing to evaluate (check the preprocess split)")
    probs, y = predict(model, test)
    pred = probs.argmax(1)
    metrics = compute_metrics(y, probs, classes, pos)
    metrics["chance_accuracy"] = float(np.bincount(y, minlength=len(classes)).max() / max(len(y), 1))
    patients = _column(test, "patient")
    clusters = patients if (patients != "").all() else None
    if s["bootstrap"] and len(y):
        metrics["ci"] = bootstrap_ci(y, probs, classes, int(s["bootstrap"]), float(s["ci_level"]), clusters,
                                     seed, pos)
    lap("metrics")

    val = None
    if s["temperature_scaling"] and (pre / "val.zarr").exists():
        vsplit = ZarrSplit(pre / "val.zarr")
        if len(vsplit):
            val = predict(model, vsplit)
    cal, scaled = calibration(probs, y, int(s["calibration_bins"]), val)
    metrics["calibration"] = cal
    lap("calibration")

    attrs = {a: _column(test, a) for a in s["subgroups"]}
    audit, table = subgroup_audit(y, probs, classes, attrs, int(s["min_group_size"]), float(s["gap_threshold"]),
                                  s["gap_metrics"], pos)
    metrics["subgroups"] = audit
    table.to_csv(out / "subgroups.csv", index=False)
    lap("subgroups")

    mode = dict(test.group.attrs).get("mode")
    mean, std = test.mean, test.std
    black = normalize(torch.zeros((1, test.channels) + tuple(test.images.shape[-2:]), dtype=torch.uint8), mean, std)
    examples = select_examples(y, pred, int(s["explain_per_class"]), seed)
    idx = np.array([i for i, _ in examples], dtype=int)
    raw = _read(test, idx)
    xs = normalize(torch.from_numpy(raw), mean, std)
    layer = gradcam_layer(model, int(s["gradcam_stage"]))
    gc, ig, delta = attribution_maps(model, xs, pred[idx], layer, int(s["ig_steps"]), black)
    plot_attributions(raw, gc, examples, y, pred, classes, "Grad-CAM", out / "gradcam.png",
                      int(s["explain_per_class"]), mode, signed=True)
    plot_attributions(raw, ig, examples, y, pred, classes, "Integrated Gradients", out / "integrated_gradients.png",
                      int(s["explain_per_class"]), mode)
    lap("explain")
    k = min(int(s["randomization_samples"]), len(idx))
    sub = np.sort(np.random.default_rng(seed).permutation(len(idx))[:k])
    if k:
        rnd = randomization_test(model, xs[sub], pred[idx][sub], lambda m: gradcam_layer(m, int(s["gradcam_stage"])),
                                 int(s["ig_steps"]), black, seed, maps=(gc[sub], ig[sub]))
    else:
        rnd = {"gradcam": None, "integrated_gradients": None, "n": 0}
    rnd = {m: (None if isinstance(v, float) and np.isnan(v) else v) for m, v in rnd.items()}
    metrics["explain"] = {
        "examples": [{"index": i, "label": classes[y[i]], "pred": classes[pred[i]], "correct": c} for i, c in examples],
        "gradcam_layer": _module_name(model, layer),
        "ig_steps": int(s["ig_steps"]), "ig_baseline": "black image (pixel value 0)",
        "ig_mean_abs_convergence_delta": float(np.abs(delta).mean()) if len(delta) else None,
        "randomization_spearman": rnd,
        "randomization_passed": {m: (rnd[m] is not None and rnd[m] < 0.5) for m in ("gradcam", "integrated_gradients")},
    }
    np.savez_compressed(out / "explain.npz", index=idx, gradcam=gc.astype(np.float32), ig=ig.astype(np.float32))
    lap("randomization")

    att = stratified_subsample(y, int(s["attack_samples"]), seed)
    xa = normalize(torch.from_numpy(_read(test, att)), mean, std).numpy()
    lo = ((0 - mean) / std).view(-1, 1, 1).numpy()
    hi = ((1 - mean) / std).view(-1, 1, 1).numpy()
    rob = robustness(model, xa, y[att], list(s["epsilons"]), lo, hi, int(s["pgd_steps"]))
    rob["chance"] = metrics["chance_accuracy"]
    pixel = float(std.mean())
    rob["epsilon_pixel"] = [float(e) * pixel for e in rob["epsilons"]]
    rob["attack"] = ("untargeted L-inf FGSM and PGD from the adversarial-robustness-toolbox (ART) on the normalized "
                     "input, clipped to the image range; epsilon_pixel = epsilon x mean std (fraction of [0, 1])")
    metrics["robustness"] = rob
    lap("robustness")

    plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, out / "confusion.png")
    plot_roc(y, probs, classes, out / "roc.png", pos)
    plot_pr(y, probs, classes, out / "pr.png", pos)
    plot_reliability(probs, y, out / "reliability.png", int(s["calibration_bins"]), scaled, cal.get("temperature"))
    plot_subgroups(audit, out / "subgroups.png")
    plot_robustness(rob, out / "robustness.png", pixel)
    save = {"probs": probs, "labels": y}
    if scaled is not None:
        save["probs_temperature_scaled"] = scaled
    np.savez_compressed(out / "predictions.npz", **save)
    lap("plots")
    metrics["settings"] = s
    metrics["seconds"] = timings
    metrics = _jsonable(metrics)
    if tracking and tracking.get("train_run_id"):
        _log(tracking, metrics, out)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The scalars logged to MLflow (prefixed ``test_``)."""
    out: dict[str, float] = {}

    def put(name, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and np.isfinite(v):
            out[f"test_{name}"] = float(v)

    for k in ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc"):
        put(k, metrics.get(k))
        ci = (metrics.get("ci") or {}).get(k)
        if ci:
            put(f"{k}_ci_low", ci[0])
            put(f"{k}_ci_high", ci[1])
    for c, v in metrics.get("per_class", {}).items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c)
        put(f"sensitivity_{safe}", v.get("sensitivity"))
        put(f"specificity_{safe}", v.get("specificity"))
    cal = metrics.get("calibration", {})
    for k in ("ece", "ece_scaled", "brier", "brier_scaled", "nll", "nll_scaled", "temperature"):
        put(k, cal.get(k))
    sg = metrics.get("subgroups", {})
    if sg.get("largest_gap"):
        put("subgroup_largest_gap", sg["largest_gap"]["gap"])
    put("subgroup_gap_flag", int(bool(sg.get("flagged"))))
    for m, v in (metrics.get("explain", {}).get("randomization_spearman") or {}).items():
        if m in ("gradcam", "integrated_gradients"):
            put(f"randomization_spearman_{m}", v)
    rob = metrics.get("robustness", {})
    for attack in ("fgsm", "pgd"):
        for e, acc in zip(rob.get("epsilons", []), rob.get(attack, [])):
            put(f"{attack}_accuracy_eps_{e:g}", acc)
    return out


def _log(tracking: dict, metrics: dict, out: Path) -> None:
    import mlflow

    from haven import track as trk

    trk.setup(tracking["experiment"], tracking["results"], tracking.get("uri"))
    with mlflow.start_run(run_id=tracking["train_run_id"]):
        mlflow.log_metrics(flat_metrics(metrics))
        for name in PLOTS + ("subgroups.csv",):
            if (out / name).is_file():
                mlflow.log_artifact(str(out / name), artifact_path="evaluate")
        mlflow.log_dict(metrics, "evaluate/metrics.json")
