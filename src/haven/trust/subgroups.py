"""Subgroup audit: the test metrics per subgroup of every coarse attribute the data carries
through anonymization (sex, age band, site), computed with fairlearn's ``MetricFrame``; per metric
the largest gap between groups with at least ``min_group_size`` images, and a flag when a gap
exceeds ``gap_threshold``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from haven.trust.metrics import positive_index

if TYPE_CHECKING:  # pandas and fairlearn load only when an audit runs
    import pandas as pd


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


def attribute_groups(values, n: int) -> tuple[np.ndarray | None, str | None]:
    """One attribute's per-image values with unknowns named ``unknown``, or (None, why it is not
    audited): not carried by the data, or a single group on the test split."""
    values = np.array(["unknown" if str(v).strip() in ("", "nan", "None") else str(v) for v in values])
    if len(values) != n or (values == "unknown").all():
        return None, "not carried by this project's data (no known value on the test split)"
    if len(np.unique(values)) < 2:
        return None, f"a single group on the test split ({values[0]})"
    return values, None


def add_attribute(out: dict, attr: str, groups: dict, overall: dict, eligible: list[str], gaps: dict,
                  gap_threshold: float) -> None:
    """One audited attribute into the audit record ``out``: its groups, gaps and largest gap, the
    record's overall largest gap and flag updated."""
    largest = max(gaps.items(), key=lambda kv: kv[1]["gap"], default=None)
    entry = {"groups": groups, "overall": overall, "eligible_groups": eligible, "gaps": gaps,
             "largest_gap": ({"metric": largest[0], **largest[1]} if largest else None),
             "flagged": bool(largest and largest[1]["gap"] > gap_threshold)}
    out["attributes"][attr] = entry
    if largest and (out["largest_gap"] is None or largest[1]["gap"] > out["largest_gap"]["gap"]):
        out["largest_gap"] = {"attribute": attr, "metric": largest[0], **largest[1]}
    out["flagged"] = out["flagged"] or entry["flagged"]


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
                   positive: int | None = None) -> tuple[dict, pd.DataFrame]:
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
    for attr, given in attributes.items():
        values, why = attribute_groups(given, len(y))
        if values is None:
            out["skipped"][attr] = why
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
        add_attribute(out, attr, groups, {m: (None if pd.isna(v) else float(v)) for m, v in mf.overall.items()},
                      [str(g) for g in eligible.index], gaps, gap_threshold)
    out["flagged_attributes"] = [a for a, e in out["attributes"].items() if e["flagged"]]
    return out, pd.DataFrame(rows, columns=["attribute", "group", "metric", "value"])
