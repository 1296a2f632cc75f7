"""Calibration of the test probabilities: expected calibration error (top-label, equal-width
bins), Brier score, NLL, the reliability bins the diagram draws, and temperature scaling fitted on
the validation split (it changes the probabilities, never the predicted class).
"""

from __future__ import annotations

import numpy as np


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
