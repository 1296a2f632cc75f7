"""The decision rule a deployed model applies to its probabilities, chosen on the validation split.

Argmax of the probabilities is right for many classes; for two, a clinic wants the cut-off on the
positive class's probability that balances sensitivity and specificity on data the model did not
train on (Youden's J = sensitivity + specificity - 1, the ROC point farthest above chance).  It is
chosen on the *validation* split, never the test split (the test metrics would be optimistic), on
the temperature-scaled probabilities when evaluate fitted a temperature (the ones a prediction
reports as calibrated), and stored in ``metrics.json`` under ``decision``; prediction
(:mod:`haven.predict.bundle`) applies it.
"""

from __future__ import annotations

import numpy as np


def youden_threshold(p_pos: np.ndarray, is_pos: np.ndarray) -> float | None:
    """The cut-off on ``p_pos`` with the largest sensitivity + specificity, midway between the
    lowest score it calls positive and the next lower score (so that a new score equal to a
    validation score is not on the edge); None when the split lacks either class."""
    from sklearn.metrics import roc_curve

    is_pos = np.asarray(is_pos, bool)
    if is_pos.all() or not is_pos.any():
        return None
    # every distinct score as a threshold, descending (the first is +inf: nothing positive)
    fpr, tpr, thr = roc_curve(is_pos, p_pos, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    if best == 0:
        return 1.0
    lower = float(thr[best + 1]) if best + 1 < len(thr) else float(thr[best])
    return float((float(thr[best]) + lower) / 2)


def choose(val_probs: np.ndarray | None, val_y: np.ndarray | None, classes: list[str], positive: int,
           temperature: float | None) -> dict:
    """The ``decision`` record: ``rule`` argmax, or for two classes ``threshold`` on the positive
    class's (calibrated where ``temperature``) probability chosen on the validation split."""
    from haven.trust.calibration import scale_temperature

    out = {"rule": "argmax", "positive": str(classes[positive]), "threshold": None, "chosen_on": None,
           "calibrated": temperature is not None}
    if len(classes) != 2 or val_probs is None or val_y is None or len(val_y) == 0:
        return out
    probs = scale_temperature(val_probs, temperature) if temperature is not None else val_probs
    t = youden_threshold(probs[:, positive], np.asarray(val_y) == positive)
    if t is None:
        return out
    return {**out, "rule": "threshold", "threshold": t, "chosen_on": "val", "criterion": "youden",
            "val_n": int(len(val_y))}


def apply(probs: np.ndarray, decision: dict | None, classes: list[str]) -> np.ndarray:
    """Predicted class indices under ``decision`` (argmax when None or when it has no threshold);
    ``probs`` are the probabilities the threshold was chosen on (calibrated when it says so)."""
    if not decision or decision.get("threshold") is None:
        return probs.argmax(1)
    pos = classes.index(decision["positive"])
    other = 1 - pos
    return np.where(probs[:, pos] >= float(decision["threshold"]), pos, other)


def view_probabilities(p: np.ndarray, threshold: float) -> np.ndarray:
    """A binary view's probability (referable retinopathy, one finding) as 2-class probabilities,
    re-centred so that ``threshold`` sits at 0.5: a monotone map (AUCs unchanged) under which argmax
    is the thresholded decision, so the pieces that read argmax (subgroup audit, example selection)
    apply the threshold chosen on validation."""
    t = float(np.clip(threshold, 1e-6, 1 - 1e-6))
    q = np.where(p < t, 0.5 * p / t, 0.5 + 0.5 * (p - t) / (1 - t))
    q = np.where(p >= t, np.maximum(q, 0.5 + 1e-9), q)  # p == t is referable, as in the rows
    return np.stack([1 - q, q], 1)
