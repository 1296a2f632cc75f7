"""Performance on the test split: accuracy, balanced accuracy, per-class sensitivity/specificity,
ROC AUC (one-vs-rest, macro, for more than two classes), PR AUC (average precision) and the
confusion matrix, with 95 % confidence intervals from a *patient-level* (cluster) bootstrap.

The bootstrap is vectorized (each resample is a row of replicate counts, every metric a weighted
sum over them) so 500 resamples cost about as much as one sklearn call per metric; slices of one
patient are correlated, so patients, not images, are resampled.
"""

from __future__ import annotations

import warnings

import numpy as np


def positive_index(classes: list[str], positive_label: str | None) -> int:
    """The class treated as positive for binary sensitivity/specificity and PR: ``positive_label``
    or, when unset, the second class (the one whose probability the binary ROC uses)."""
    if positive_label is not None:
        if positive_label not in classes:
            raise ValueError(f"evaluate.positive_label {positive_label!r} is not a class ({', '.join(classes)})")
        return classes.index(positive_label)
    return 1 if len(classes) > 1 else 0


def compute_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], positive: int | None = None) -> dict:
    """The headline test metrics of single-label classification (what ``Classification.metrics``
    returns); undefined AUCs (a class absent from ``y``) are None rather than an error."""
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


def percentile_interval(v: np.ndarray, level: float, resamples: int) -> list[float] | None:
    """The percentile interval ``[low, high]`` of the finite bootstrap replicates ``v``; None when
    fewer than half of the ``resamples`` define the metric."""
    v = v[np.isfinite(v)]
    if len(v) < max(1, resamples // 2):
        return None
    a = (1 - level) / 2
    lo, hi = np.percentile(v, [100 * a, 100 * (1 - a)])
    return [float(lo), float(hi)]


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

    def ci(v: np.ndarray) -> list[float] | None:
        return percentile_interval(v, level, n_resamples)

    out = {name: ci(reps[name]) for name in ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc")}
    out["per_class"] = {c: {"sensitivity": ci(reps[f"sensitivity/{i}"]),
                            "specificity": ci(reps[f"specificity/{i}"])} for i, c in enumerate(classes)}
    unit = "patient" if clusters is not None and len(np.unique(clusters)) < len(y) else "image"
    out.update(resamples=int(n_resamples), level=float(level), unit=unit)
    return out
