"""Ordinal grading's numbers on plain arrays: the predicted grade, quadratic weighted kappa, the
referable view, their patient-level bootstrap intervals, the report's tables, MLflow's scalars and
the prediction rows.  The evaluate stage's body is :mod:`haven.trust.ordinal`.

``scores`` are always the K grade probabilities (:meth:`haven.learn.tasks.ordinal.Ordinal.scores`).
One rule turns them into a grade everywhere (metrics, decision, prediction rows):
:func:`grade`, the median of the distribution = the number of k with P(y > k) > 0.5.  For a CORN
head it is CORN's own rank-consistent rule; for a softmax head it minimizes the expected absolute
error in grades (argmax ignores the order: p = (.4, 0, 0, 0, .6) would say 4 where a grader in
doubt between 0 and 4 is better served by the median).  The referable view is P(y >= cut), the
sum of the grade probabilities from the cut up.
"""

from __future__ import annotations

import warnings

import numpy as np

from haven.trust.context import put_scalar
from haven.trust.metrics import (bootstrap_ci, bootstrap_weights, compute_metrics, percentile_interval,
                                 replicate_metrics)

VIEW_CLASSES = ["not referable", "referable"]


def grade(scores: np.ndarray) -> np.ndarray:
    """The median grade of each row of grade probabilities (N, K): #{k < K-1 : P(y > k) > 0.5}."""
    scores = np.asarray(scores, np.float64)
    above = np.cumsum(scores[:, ::-1], axis=1)[:, ::-1][:, 1:]  # P(y > k) = sum of p_j, j > k
    return (above > 0.5).sum(1).astype(np.int64)


def referable_probability(scores: np.ndarray, cut: int) -> np.ndarray:
    """P(grade >= cut) = the sum of the grade probabilities from ``cut`` up."""
    return np.asarray(scores, np.float64)[:, cut:].sum(1)


def quadratic_kappa(y: np.ndarray, pred: np.ndarray, k: int) -> float | None:
    """scikit-learn's quadratic weighted Cohen kappa over grades 0..k-1; None when undefined
    (a single grade in both the truth and the predictions)."""
    from sklearn.metrics import cohen_kappa_score

    if len(y) == 0:
        return None
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        v = cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(k)))
    return float(v) if np.isfinite(v) else None


def ordinal_metrics(y: np.ndarray, scores: np.ndarray, cut: int, threshold: float | None = None) -> dict:
    """The headline test metrics: ``qwk``, ``accuracy``, ``mae`` (grades), ``confusion_matrix``
    (K x K), ``per_class`` per grade {sensitivity, specificity} and ``balanced_accuracy`` (their
    mean recall), and the referable view (``referable``: ROC/PR AUC of P(grade >= cut) and
    sensitivity/specificity at ``threshold``, 0.5 when None).  ``roc_auc`` and ``pr_auc`` at top
    level are the referable view's: the model card and a ``best_metric: test_balanced_accuracy`` or
    ``test_roc_auc`` read those keys for any task."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y, np.int64)
    k = scores.shape[1]
    classes = [str(i) for i in range(k)]
    pred = grade(scores)
    out = compute_metrics(y, np.eye(k)[pred], classes)  # accuracy, balanced accuracy, confusion, per grade
    out.update(qwk=quadratic_kappa(y, pred, k), mae=float(np.abs(pred - y).mean()) if len(y) else None)
    y2, p2 = (y >= cut).astype(np.int64), referable_probability(scores, cut)
    t = 0.5 if threshold is None else float(threshold)
    pred2 = p2 >= t
    ref = {"cut": int(cut), "definition": f"grade >= {cut}", "n_referable": int(y2.sum()),
           "prevalence": float(y2.mean()) if len(y) else None, "roc_auc": None, "pr_auc": None,
           "threshold": t, "threshold_chosen_on": "val" if threshold is not None else None,
           "sensitivity": float(pred2[y2 == 1].mean()) if y2.any() else None,
           "specificity": float((~pred2[y2 == 0]).mean()) if (y2 == 0).any() else None}
    if 0 < y2.sum() < len(y2):
        ref["roc_auc"] = float(roc_auc_score(y2, p2))
        ref["pr_auc"] = float(average_precision_score(y2, p2))
    out["referable"] = ref
    out["roc_auc"], out["pr_auc"] = ref["roc_auc"], ref["pr_auc"]
    return out


def grade_replicates(y: np.ndarray, pred: np.ndarray, weights: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """QWK and MAE for each row of bootstrap ``weights`` (B, n), vectorized: equal to
    ``cohen_kappa_score(y, pred, weights="quadratic", sample_weight=w)`` row by row (NaN where
    undefined)."""
    n = len(y)
    cell = np.zeros((n, k * k))
    cell[np.arange(n), y * k + pred] = 1.0
    cm = (weights @ cell).reshape(-1, k, k)
    total = cm.sum((1, 2))
    i, j = np.indices((k, k))
    w2 = (i - j) ** 2.0
    observed = (cm * w2).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = (cm.sum(2)[:, :, None] * cm.sum(1)[:, None, :] * w2).sum((1, 2)) / total
        qwk = np.where(expected > 0, 1 - observed / expected, np.nan)
        mae = (weights @ np.abs(y - pred).astype(np.float64)) / total
    return {"qwk": qwk, "mae": mae}


def bootstrap_intervals(y: np.ndarray, scores: np.ndarray, cut: int, threshold: float, resamples: int,
                        level: float, clusters: np.ndarray | None, seed: int) -> dict:
    """Percentile intervals of every headline metric from one set of patient-level (cluster)
    resamples: QWK, MAE, accuracy, balanced accuracy, per-grade sensitivity/specificity, and the
    referable view's ROC/PR AUC (:func:`haven.trust.metrics.bootstrap_ci` on P(grade >= cut)) and
    its sensitivity/specificity at ``threshold``.  Every call below draws the same resamples
    (same n, clusters and seed)."""
    y = np.asarray(y, np.int64)
    k = scores.shape[1]
    pred = grade(scores)
    w = bootstrap_weights(len(y), resamples, clusters, seed)
    reps = {**replicate_metrics(y, np.eye(k)[pred], w, 1), **grade_replicates(y, pred, w, k)}
    out = {m: percentile_interval(reps[m], level, resamples) for m in ("qwk", "mae", "accuracy", "balanced_accuracy")}
    out["per_class"] = {str(g): {"sensitivity": percentile_interval(reps[f"sensitivity/{g}"], level, resamples),
                                 "specificity": percentile_interval(reps[f"specificity/{g}"], level, resamples)}
                        for g in range(k)}
    y2, p2 = (y >= cut).astype(np.int64), referable_probability(scores, cut)
    view = bootstrap_ci(y2, np.stack([1 - p2, p2], 1), VIEW_CLASSES, resamples, level, clusters, seed, 1)
    at_t = bootstrap_ci(y2, np.eye(2)[(p2 >= threshold).astype(int)], VIEW_CLASSES, resamples, level, clusters,
                        seed, 1)["per_class"]["referable"]
    out.update(roc_auc=view["roc_auc"], pr_auc=view["pr_auc"], referable_sensitivity=at_t["sensitivity"],
               referable_specificity=at_t["specificity"], resamples=view["resamples"], level=view["level"],
               unit=view["unit"])
    return out


def _cell(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _with_ci(v, ci) -> str:
    return _cell(v) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def tables(metrics: dict) -> list[dict]:
    """The report's ordinal tables (``metrics["tables"]``): kappa and the referable view with
    their intervals, the per-grade table and the grade confusion matrix."""
    ci, ref = metrics.get("ci") or {}, metrics["referable"]
    level = f"{round(100 * ci['level'])} %" if ci else "no"
    rows = [["quadratic weighted kappa", _with_ci(metrics["qwk"], ci.get("qwk"))],
            ["accuracy (exact grade)", _with_ci(metrics["accuracy"], ci.get("accuracy"))],
            ["mean absolute error (grades)", _with_ci(metrics["mae"], ci.get("mae"))],
            [f"referable ({ref['definition']}) ROC AUC", _with_ci(ref["roc_auc"], ci.get("roc_auc"))],
            ["referable PR AUC", _with_ci(ref["pr_auc"], ci.get("pr_auc"))],
            [f"referable sensitivity at P >= {ref['threshold']:.3f}",
             _with_ci(ref["sensitivity"], ci.get("referable_sensitivity"))],
            [f"referable specificity at P >= {ref['threshold']:.3f}",
             _with_ci(ref["specificity"], ci.get("referable_specificity"))]]
    cm = np.asarray(metrics["confusion_matrix"])
    grades = list(metrics["per_class"])
    per_ci = ci.get("per_class") or {}
    per_grade = [[g, int(cm[i].sum()), int(cm[:, i].sum()),
                  _with_ci(v["sensitivity"], (per_ci.get(g) or {}).get("sensitivity")),
                  _with_ci(v["specificity"], (per_ci.get(g) or {}).get("specificity"))]
                 for i, (g, v) in enumerate(metrics["per_class"].items())]
    unit = ci.get("unit", "patient")
    chosen = "chosen on the validation split (Youden's J)" if ref.get("threshold_chosen_on") == "val" else \
        "the default 0.5 (no validation split with both views to choose one on)"
    return [
        {"title": "Grading agreement and the referable view", "header": ["metric", f"value [{level} CI]"],
         "rows": rows, "note": f"Predicted grade = the median of the grade probabilities. Intervals: percentile "
                               f"bootstrap over {ci.get('resamples', 0)} resamples of {unit}s. Referable threshold "
                               f"{chosen}."},
        {"title": "Per grade", "header": ["grade", "n (true)", "n (predicted)", "sensitivity", "specificity"],
         "rows": per_grade, "note": "Sensitivity = recall of the grade; specificity = 1 - the rate at which other "
                                    "grades are called this one."},
        {"title": "Grade confusion (rows: true, columns: predicted)", "header": ["true \\ predicted", *grades],
         "rows": [[g, *[int(v) for v in cm[i]]] for i, g in enumerate(grades)],
         "note": "Off-diagonal cells far from the diagonal cost most in the quadratic kappa."},
    ]


def flat_metrics(metrics: dict) -> dict[str, float]:
    """classify's scalars (accuracy, balanced accuracy, ROC/PR AUC = the referable view's,
    per-grade sensitivity/specificity, calibration, subgroups, explanations, TTA, robustness) plus
    ``test_qwk``, ``test_mae`` and the referable view's, with interval bounds."""
    from haven.trust.classify import flat_metrics as classify_flat

    out = classify_flat(metrics)
    ci, ref = metrics.get("ci") or {}, metrics.get("referable") or {}
    for name, v, bounds in (("qwk", metrics.get("qwk"), ci.get("qwk")), ("mae", metrics.get("mae"), ci.get("mae")),
                            ("referable_roc_auc", ref.get("roc_auc"), ci.get("roc_auc")),
                            ("referable_pr_auc", ref.get("pr_auc"), ci.get("pr_auc")),
                            ("referable_sensitivity", ref.get("sensitivity"), ci.get("referable_sensitivity")),
                            ("referable_specificity", ref.get("specificity"), ci.get("referable_specificity"))):
        put_scalar(out, name, v)
        if bounds:
            put_scalar(out, f"{name}_ci_low", bounds[0])
            put_scalar(out, f"{name}_ci_high", bounds[1])
    put_scalar(out, "referable_threshold", ref.get("threshold"))
    put_scalar(out, "tta_qwk", ((metrics.get("tta") or {}).get("qwk") or {}).get("with"))
    return out


def prediction_rows(scores: np.ndarray, evaluation: dict, classes: list[str], cut: int) -> list[dict]:
    """One row per sample: ``p_<grade>``, ``pcal_<grade>`` (temperature-scaled where evaluate
    fitted a temperature), ``p_referable``, ``predicted`` (the median grade of the model's own
    probabilities) and ``referable`` (yes/no: P(referable) >= the validation threshold, 0.5 when
    none was chosen)."""
    from haven.trust.calibration import scale_temperature

    if len(scores) == 0:
        return []
    t = evaluation.get("temperature")
    calibrated = scale_temperature(scores, t) if t is not None else scores
    threshold = (evaluation.get("decision") or {}).get("threshold")
    threshold = 0.5 if threshold is None else float(threshold)
    p2, pred = referable_probability(scores, cut), grade(scores)
    return [{**{f"p_{c}": float(p[j]) for j, c in enumerate(classes)},
             **{f"pcal_{c}": float(q[j]) for j, c in enumerate(classes)},
             "p_referable": float(r), "predicted": classes[int(g)], "referable": "yes" if r >= threshold else "no"}
            for p, q, r, g in zip(scores, calibrated, p2, pred)]
