"""Multi-label detection's numbers on plain arrays: per-finding ROC/PR AUC and sensitivity /
specificity at a threshold, macro and micro ROC AUC, the RSNA weighted multi-label log loss, their
patient-level bootstrap intervals, the report's tables, MLflow's scalars and the prediction rows.
The evaluate stage's body is :mod:`haven.trust.multilabel`.

``y`` is the (N, L) 0/1 target matrix and ``p`` the (N, L) sigmoid probabilities, one column per
finding.

Weighted multi-label log loss (the RSNA Intracranial Hemorrhage Detection metric): the weighted
mean over findings of each finding's binary log loss (mean over images of -[y log p + (1-y)
log(1-p)], p clipped to [eps, 1-eps] as scikit-learn's ``log_loss`` does), a finding named ``any``
(case-insensitive) weighing 2 and every other finding 1, as the challenge weighed its ``any``
label twice.  (The challenge averaged each image's weighted row loss; with one weight per column
that is the same number.)
"""

from __future__ import annotations

import warnings

import numpy as np

from haven.trust.context import put_scalar, safe_name
from haven.trust.metrics import (bootstrap_weights, percentile_interval, replicate_metrics, weighted_auc,
                                 weighted_average_precision)

ANY_WEIGHT = 2.0  # the RSNA challenge's weight of `any`; every other finding weighs 1


def view_classes(label: str) -> list[str]:
    """The class names of one finding's binary view."""
    return [f"no {label}", label]


def label_weights(classes: list[str]) -> np.ndarray:
    """Each finding's weight in the weighted log loss: 2 for ``any``, 1 otherwise."""
    return np.array([ANY_WEIGHT if c.strip().lower() == "any" else 1.0 for c in classes])


def per_sample_log_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(N, L) binary log losses, probabilities clipped at float64's eps (scikit-learn's rule)."""
    eps = np.finfo(np.float64).eps
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    y = np.asarray(y, np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def weighted_log_loss(y: np.ndarray, p: np.ndarray, classes: list[str]) -> float | None:
    """The RSNA weighted multi-label log loss (see the module docstring)."""
    if len(y) == 0:
        return None
    w = label_weights(classes)
    return float(per_sample_log_loss(y, p).mean(0) @ w / w.sum())


def _defined(y: np.ndarray) -> np.ndarray:
    """Findings with both classes present (the ones an AUC exists for)."""
    pos = np.asarray(y).sum(0)
    return (pos > 0) & (pos < len(y))


def macro_micro_auc(y: np.ndarray, p: np.ndarray) -> tuple[float | None, float | None]:
    """Macro ROC AUC (the mean over findings with both classes) and micro ROC AUC (every image x
    finding pair as one binary problem); None where undefined."""
    from sklearn.metrics import roc_auc_score

    y, p = np.asarray(y), np.asarray(p)
    ok = _defined(y)
    macro = float(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in np.flatnonzero(ok)])) if ok.any() else None
    flat = y.ravel()
    micro = float(roc_auc_score(flat, p.ravel())) if 0 < flat.sum() < len(flat) else None
    return macro, micro


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def multilabel_metrics(y: np.ndarray, p: np.ndarray, classes: list[str], thresholds: list[float] | None = None
                       ) -> dict:
    """The headline test metrics: per finding (``labels``) prevalence, ROC AUC, PR AUC (average
    precision), log loss and sensitivity / specificity at its threshold (0.5 where None);
    ``macro_roc_auc``, ``micro_roc_auc``, ``weighted_log_loss``; and for the readers written for one
    label per image ``roc_auc`` (= macro), ``pr_auc`` (macro average precision), ``per_class``,
    ``balanced_accuracy`` (mean over findings of (sensitivity + specificity) / 2) and
    ``accuracy`` (mean over findings of the accuracy, i.e. 1 - the Hamming loss)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p = np.asarray(y, np.float64).reshape(len(y), len(classes)), np.asarray(p, np.float64)
    t = [0.5 if v is None else float(v) for v in (thresholds or [None] * len(classes))]
    losses = per_sample_log_loss(y, p).mean(0) if len(y) else np.full(len(classes), np.nan)
    labels, ok = {}, _defined(y)
    for j, c in enumerate(classes):
        yj, call = y[:, j] == 1, p[:, j] >= t[j]
        sens = float(call[yj].mean()) if yj.any() else None
        spec = float((~call[~yj]).mean()) if (~yj).any() else None
        labels[c] = {"n_positive": int(yj.sum()), "prevalence": float(yj.mean()) if len(y) else None,
                     "roc_auc": float(roc_auc_score(yj, p[:, j])) if ok[j] else None,
                     "pr_auc": float(average_precision_score(yj, p[:, j])) if ok[j] else None,
                     "log_loss": float(losses[j]) if len(y) else None, "threshold": t[j],
                     "sensitivity": sens, "specificity": spec,
                     "balanced_accuracy": _mean([sens, spec]),
                     "accuracy": float((call == yj).mean()) if len(y) else None}
    macro, micro = macro_micro_auc(y, p) if len(y) else (None, None)
    return {"n": int(len(y)), "classes": list(classes), "labels": labels,
            "macro_roc_auc": macro, "micro_roc_auc": micro, "weighted_log_loss": weighted_log_loss(y, p, classes),
            "log_loss_weights": {c: float(w) for c, w in zip(classes, label_weights(classes))},
            "roc_auc": macro, "pr_auc": _mean([v["pr_auc"] for v in labels.values()]),
            "balanced_accuracy": _mean([v["balanced_accuracy"] for v in labels.values()]),
            "accuracy": _mean([v["accuracy"] for v in labels.values()]),
            "per_class": {c: {"sensitivity": v["sensitivity"], "specificity": v["specificity"]}
                          for c, v in labels.items()}}


def sorted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC per row of ``weights`` (B, n), as :func:`haven.trust.metrics.weighted_auc`, by a sort
    and ``np.add.reduceat`` over tie groups instead of an (n, levels) one-hot: the micro AUC's n is
    images x findings, whose one-hot would not fit in memory."""
    order = np.argsort(scores, kind="mergesort")
    s, pos = np.asarray(scores)[order], np.asarray(positive, bool)[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w = weights[:, order]
    pw = np.add.reduceat(w * pos, starts, axis=1)
    nw = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(nw, axis=1) - nw
    num = (pw * (below + 0.5 * nw)).sum(1)
    den = pw.sum(1) * nw.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample defining no finding: NaN
        return np.nanmean(a, axis=axis)


def bootstrap_intervals(y: np.ndarray, p: np.ndarray, classes: list[str], thresholds: list[float], resamples: int,
                        level: float, clusters: np.ndarray | None, seed: int) -> dict:
    """Percentile intervals from one set of patient-level (cluster) resamples
    (:func:`haven.trust.metrics.bootstrap_weights`): per finding ROC AUC, PR AUC and
    sensitivity / specificity at its threshold (``per_class``); the macro ROC AUC (the mean, per
    resample, over the findings with both classes in it), micro ROC AUC, weighted log loss, macro
    PR AUC and the mean balanced accuracy and accuracy."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    n, k = y.shape
    w = bootstrap_weights(n, resamples, clusters, seed)
    auc, ap, ba, acc, per = np.full((resamples, k), np.nan), np.full((resamples, k), np.nan), [], [], {}
    for j, c in enumerate(classes):
        yj = y[:, j].astype(np.int64)
        hard = replicate_metrics(yj, np.eye(2)[(p[:, j] >= thresholds[j]).astype(int)], w, 1)
        ba.append(hard["balanced_accuracy"])
        acc.append(hard["accuracy"])
        if 0 < yj.sum() < n:
            auc[:, j] = weighted_auc(p[:, j], yj == 1, w)
            ap[:, j] = weighted_average_precision(p[:, j], yj == 1, w)
        per[c] = {"sensitivity": percentile_interval(hard["sensitivity/1"], level, resamples),
                  "specificity": percentile_interval(hard["specificity/1"], level, resamples),
                  "roc_auc": percentile_interval(auc[:, j], level, resamples), "pr_auc": percentile_interval(ap[:, j], level, resamples)}
    lw = label_weights(classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        wll = (w @ per_sample_log_loss(y, p)) / w.sum(1, keepdims=True) @ lw / lw.sum()
    micro = sorted_auc(p.ravel(), y.ravel() == 1, np.repeat(w, k, axis=1))  # column i*k+j: image i's weight
    macro = _nanmean(auc, 1)
    out = {"macro_roc_auc": percentile_interval(macro, level, resamples), "micro_roc_auc": percentile_interval(micro, level, resamples),
           "weighted_log_loss": percentile_interval(wll, level, resamples),
           "pr_auc": percentile_interval(_nanmean(ap, 1), level, resamples),
           "balanced_accuracy": percentile_interval(_nanmean(np.stack(ba, 1), 1), level, resamples),
           "accuracy": percentile_interval(_nanmean(np.stack(acc, 1), 1), level, resamples), "per_class": per}
    out["roc_auc"] = out["macro_roc_auc"]
    unit = "patient" if clusters is not None and len(np.unique(clusters)) < n else "image"
    out.update(resamples=int(resamples), level=float(level), unit=unit)
    return out


def scale_binary(p: np.ndarray, temperature: float | None) -> np.ndarray:
    """sigmoid(logit(p) / T): a finding's temperature scaling (T None: unchanged).  Equal to
    :func:`haven.trust.calibration.scale_temperature` on the view ``[1 - p, p]``."""
    if temperature is None:
        return np.asarray(p, np.float64)
    q = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return 1 / (1 + np.exp(-(np.log(q) - np.log1p(-q)) / float(temperature)))


def _cell(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _with_ci(v, ci) -> str:
    return _cell(v) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def tables(metrics: dict) -> list[dict]:
    """The report's multi-label tables (``metrics["tables"]``): the summary with intervals, one row
    per finding, and the subgroup audit per finding."""
    ci = metrics.get("ci") or {}
    level = f"{round(100 * ci['level'])} %" if ci else "no"
    per_ci, cal = ci.get("per_class") or {}, metrics.get("calibration_per_label") or {}
    summary = [["macro ROC AUC", _with_ci(metrics["macro_roc_auc"], ci.get("macro_roc_auc"))],
               ["micro ROC AUC", _with_ci(metrics["micro_roc_auc"], ci.get("micro_roc_auc"))],
               ["weighted multi-label log loss (RSNA)", _with_ci(metrics["weighted_log_loss"],
                                                                ci.get("weighted_log_loss"))],
               ["mean balanced accuracy at the thresholds", _with_ci(metrics["balanced_accuracy"],
                                                                    ci.get("balanced_accuracy"))]]
    rows = []
    for c, v in metrics["labels"].items():
        pc = per_ci.get(c) or {}
        rows.append([c, _cell(v["prevalence"]), _with_ci(v["roc_auc"], pc.get("roc_auc")),
                     _with_ci(v["pr_auc"], pc.get("pr_auc")), f"{v['threshold']:.3f}",
                     _with_ci(v["sensitivity"], pc.get("sensitivity")),
                     _with_ci(v["specificity"], pc.get("specificity")), _cell((cal.get(c) or {}).get("ece"))])
    weights = ", ".join(f"{c} {w:g}" for c, w in metrics["log_loss_weights"].items())
    d = metrics.get("decision") or {}
    chosen = [c for c, o in (d.get("chosen_on") or {}).items() if o == "val"]
    out = [
        {"title": "Multi-label summary", "header": ["metric", f"value [{level} CI]"], "rows": summary,
         "note": f"Intervals: percentile bootstrap over {ci.get('resamples', 0)} resamples of "
                 f"{ci.get('unit', 'patient')}s. Macro = mean over findings with both classes on the test split; micro = every image x finding "
                 f"pair pooled. Log loss weights: {weights} (lower is better)."},
        {"title": "Per finding", "header": ["finding", "prevalence", "ROC AUC", "PR AUC", "threshold", "sensitivity",
                                            "specificity", "ECE"], "rows": rows,
         "note": f"Thresholds chosen on the validation split (Youden's J) for: {', '.join(chosen) or 'none'}; the "
                 f"others use 0.5. ECE of each finding's yes/no view (top-label, before temperature scaling)."},
    ]
    sg = (metrics.get("subgroups") or {}).get("per_label") or {}
    if sg:
        out.append({"title": "Subgroup audit per finding", "header": ["finding", "largest gap", "metric", "attribute",
                                                                       "worst group", "flagged"],
                    "rows": [[c, _cell((e.get("largest_gap") or {}).get("gap")),
                              (e.get("largest_gap") or {}).get("metric", "–"),
                              (e.get("largest_gap") or {}).get("attribute", "–"),
                              (e.get("largest_gap") or {}).get("worst", "–"), "yes" if e.get("flagged") else "no"]
                             for c, e in sg.items()],
                    "note": "Each finding's yes/no view at its threshold; every group's numbers are in the subgroup "
                            "table (column label)."})
    return out


def flat_metrics(metrics: dict) -> dict[str, float]:
    """classify's scalars (accuracy, balanced accuracy, ROC AUC = macro, per-finding sensitivity /
    specificity, the summary finding's calibration, subgroups, explanations, robustness) plus the
    macro / micro ROC AUC, the weighted log loss and each finding's AUCs, threshold and ECE."""
    from haven.trust.classify import flat_metrics as classify_flat

    out = classify_flat(metrics)
    ci = metrics.get("ci") or {}

    def put(name, v, bounds=None):
        put_scalar(out, name, v)
        if bounds:
            put_scalar(out, f"{name}_ci_low", bounds[0])
            put_scalar(out, f"{name}_ci_high", bounds[1])

    for k in ("macro_roc_auc", "micro_roc_auc", "weighted_log_loss"):
        put(k, metrics.get(k), ci.get(k))
        put(f"tta_{k}", ((metrics.get("tta") or {}).get(k) or {}).get("with"))
    for c, v in (metrics.get("labels") or {}).items():
        safe, pc = safe_name(c), (ci.get("per_class") or {}).get(c) or {}
        for k in ("roc_auc", "pr_auc", "sensitivity", "specificity"):
            put(f"{k}_{safe}", v.get(k), pc.get(k))
        put(f"threshold_{safe}", v.get("threshold"))
        cal = (metrics.get("calibration_per_label") or {}).get(c) or {}
        for k in ("ece", "ece_scaled", "temperature"):
            put(f"{k}_{safe}", cal.get(k))
    return out


def prediction_rows(scores: np.ndarray, evaluation: dict, classes: list[str]) -> list[dict]:
    """One row per sample: ``p_<finding>``, ``pcal_<finding>`` (the finding's temperature from
    ``decision["temperatures"]``) and ``predicted``: the findings whose probability (the calibrated
    one when the thresholds were chosen on calibrated probabilities) is at or above their
    threshold (0.5 where none was chosen), joined by ``+``; ``none`` when no finding is."""
    if len(scores) == 0:
        return []
    d = evaluation.get("decision") or {}
    temps, thr = d.get("temperatures") or {}, d.get("thresholds") or {}
    cal = np.stack([scale_binary(scores[:, j], temps.get(c)) for j, c in enumerate(classes)], 1)
    on = cal if d.get("calibrated") else np.asarray(scores, np.float64)
    cut = np.array([0.5 if thr.get(c) is None else float(thr[c]) for c in classes])
    calls = on >= cut
    return [{**{f"p_{c}": float(p[j]) for j, c in enumerate(classes)},
             **{f"pcal_{c}": float(q[j]) for j, c in enumerate(classes)},
             "predicted": "+".join(c for c, hit in zip(classes, row) if hit) or "none"}
            for p, q, row in zip(scores, cal, calls)]
