"""Segmentation metrics: Dice, IoU and HD95 per case (image) and foreground class from MONAI, their
means with patient-level bootstrap intervals, and the image-level "lesion present" view.

Conventions (tested in tests/test_segmentation.py):

* **Dice, IoU** (``monai.metrics.DiceMetric`` / ``MeanIoU`` with ``ignore_empty=False``): when the
  truth has no pixel of a class, the case scores 1 if the prediction has none either (the model
  correctly found nothing) and 0 if it predicted some.  The mean over all cases therefore rewards
  clean negatives; ``dice_present`` is the mean over cases whose truth holds the class (the usual
  "lesion Dice").
* **HD95** (``HausdorffDistanceMetric(percentile=95)``, symmetric, in pixels or in ``spacing``
  units): undefined when the truth or the prediction is empty (MONAI returns NaN or inf); such
  cases are reported as None, left out of the mean, and counted (``hd95_undefined``).
* Classes: ``classes[0]`` is the background; metrics are reported per foreground class and as the
  mean over foreground classes per case (``dice`` etc. at top level).
* Image level: a case is *present* (positive) when its truth mask has any foreground pixel; its
  score is the highest per-pixel foreground probability (1 - p_background); it is *predicted*
  present when the predicted mask has any foreground pixel.  ROC AUC, sensitivity and specificity
  come from scikit-learn.

Intervals resample patients (haven.trust.metrics.bootstrap_weights, the same cluster bootstrap as
classification's CIs): slices of one patient are correlated.
"""

from __future__ import annotations

import warnings

import numpy as np

from haven.trust.metrics import bootstrap_weights, percentile_interval, weighted_auc

__all__ = ["aggregate", "case_metrics", "image_level", "lesion_view", "one_hot", "segmentation_metrics"]

METRICS = ("dice", "iou", "hd95")


def one_hot(masks: np.ndarray, k: int):
    """(N, H, W) integer masks -> (N, K, H, W) float torch tensor (MONAI's metric input); volumes
    (N, D, H, W) -> (N, K, D, H, W)."""
    import torch

    m = np.asarray(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim not in (3, 4):
        raise ValueError(f"masks must be (N, H, W) integer class maps (volumes: (N, D, H, W)), got shape {m.shape}")
    if m.size and (m.min() < 0 or m.max() >= k):
        raise ValueError(f"mask values must lie in 0..{k - 1} (one per class), found {m.min()}..{m.max()}")
    t = torch.as_tensor(m.astype(np.int64))
    return torch.nn.functional.one_hot(t, k).permute(0, m.ndim, *range(1, m.ndim)).float()


def case_metrics(truth: np.ndarray, pred: np.ndarray, classes: list[str],
                 spacing: tuple[float, ...] | None = None) -> dict:
    """Per case and foreground class: ``{"dice": (N, K-1), "iou": (N, K-1), "hd95": (N, K-1)}``
    float arrays with NaN where HD95 is undefined, plus ``"present"`` (N, K-1) bool (truth has the
    class) and ``"predicted"`` (N, K-1) bool (prediction has it)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    k = len(classes)
    if k < 2:
        raise ValueError(f"segmentation needs a background and >= 1 foreground class, got {classes}")
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and predicted {pred.shape} masks differ in shape")
    y, p = one_hot(truth, k), one_hot(pred, k)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, y)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(p, y)
    kwargs = {"spacing": list(spacing)} if spacing is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for every empty mask; counted below instead
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, y, **kwargs)
    hd = hd.numpy().astype(np.float64)
    hd[~np.isfinite(hd)] = np.nan
    present = y[:, 1:].flatten(2).amax(2).numpy() > 0
    predicted = p[:, 1:].flatten(2).amax(2).numpy() > 0
    hd[~(present & predicted)] = np.nan  # undefined with an empty side, whatever MONAI returned
    return {"dice": dice.numpy().astype(np.float64), "iou": iou.numpy().astype(np.float64), "hd95": hd,
            "present": present, "predicted": predicted}


def _mean(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def _per_case(per_class: np.ndarray) -> np.ndarray:
    """Mean over foreground classes per case (NaN where every class is undefined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_class, axis=1)


def _weighted_means(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mean of the defined values of ``v`` (n,) under each bootstrap weight row (B, n)."""
    ok = np.isfinite(v)
    ww = w[:, ok]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ww @ v[ok]) / ww.sum(1)


def aggregate(cases: dict, classes: list[str], clusters: np.ndarray | None = None, n_resamples: int = 500,
              level: float = 0.95, seed: int = 0) -> dict:
    """Means of :func:`case_metrics` with bootstrap intervals over ``clusters`` (patients).

    ``{"dice", "iou", "hd95", "dice_present", "hd95_undefined", "per_class": {name: {...}},
    "ci": {"dice": [lo, hi], ..., "per_class": {...}, "level", "resamples", "unit"}}``."""
    n = len(cases["dice"])
    w = bootstrap_weights(n, n_resamples, clusters, seed) if n else np.zeros((n_resamples, 0))
    out: dict = {"per_class": {}}
    ci: dict = {"per_class": {}}

    def summarise(values: dict[str, np.ndarray], present: np.ndarray, dst: dict, dst_ci: dict) -> None:
        for name in METRICS:
            dst[name] = _mean(values[name])
            dst_ci[name] = percentile_interval(_weighted_means(values[name], w), level, n_resamples) if n else None
        lesion = np.where(present, values["dice"], np.nan)
        dst["dice_present"] = _mean(lesion)
        dst_ci["dice_present"] = percentile_interval(_weighted_means(lesion, w), level, n_resamples) if n else None
        dst["hd95_undefined"] = int((~np.isfinite(values["hd95"])).sum())

    summarise({m: _per_case(cases[m]) for m in METRICS}, cases["present"].any(1), out, ci)
    for j, name in enumerate(classes[1:]):
        out["per_class"][name], ci["per_class"][name] = {}, {}
        summarise({m: cases[m][:, j] for m in METRICS}, cases["present"][:, j],
                  out["per_class"][name], ci["per_class"][name])
    unit = "patient" if clusters is not None and len(np.unique(clusters)) < n else "image"
    ci.update(level=float(level), resamples=int(n_resamples), unit=unit)
    out["ci"] = ci
    out["n"] = int(n)
    return out


def lesion_view(truth: np.ndarray, probs: np.ndarray, min_pixels: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image-level view: (present (N,) int 0/1 from the truth masks, score (N,) = max per-pixel
    foreground probability, predicted (N,) int 0/1 = the argmax mask has at least ``min_pixels``
    foreground pixels: a speck of a few pixels is noise, not a finding).
    ``probs`` is (N, K, H, W) softmax output (volumes: (N, K, D, H, W), masks (N, D, H, W))."""
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(truth)
    if probs.ndim == 4 and truth.ndim == 4:
        truth = truth[:, 0]
    if probs.ndim not in (4, 5) or probs.shape[0] != truth.shape[0] or probs.shape[2:] != truth.shape[1:]:
        raise ValueError(f"probabilities (N, K, H, W) {probs.shape} do not fit the masks (N, H, W) {truth.shape}")
    present = (truth.reshape(len(truth), -1) > 0).any(1).astype(int)
    score = (1.0 - probs[:, 0]).reshape(len(probs), -1).max(1)
    predicted = ((probs.argmax(1).reshape(len(probs), -1) > 0).sum(1) >= max(1, int(min_pixels))).astype(int)
    return present, score, predicted


def image_level(present: np.ndarray, score: np.ndarray, predicted: np.ndarray, clusters: np.ndarray | None = None,
                n_resamples: int = 500, level: float = 0.95, seed: int = 0) -> dict:
    """ROC AUC, sensitivity and specificity of "lesion present" with bootstrap intervals."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    n = len(present)
    tn, fp, fn, tp = confusion_matrix(present, predicted, labels=[0, 1]).ravel()
    auc = float(roc_auc_score(present, score)) if len(np.unique(present)) == 2 else None
    out = {"n": int(n), "n_present": int(present.sum()), "roc_auc": auc,
           "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
           "specificity": float(tn / (tn + fp)) if tn + fp else None}
    w = bootstrap_weights(n, n_resamples, clusters, seed)
    pos, hit = present.astype(bool), predicted.astype(bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (w[:, pos & hit].sum(1)) / w[:, pos].sum(1)
        spec = (w[:, ~pos & ~hit].sum(1)) / w[:, ~pos].sum(1)
    out["ci"] = {"roc_auc": percentile_interval(weighted_auc(score, pos, w), level, n_resamples),
                 "sensitivity": percentile_interval(sens, level, n_resamples),
                 "specificity": percentile_interval(spec, level, n_resamples)}
    return out


def segmentation_metrics(truth: np.ndarray, probs: np.ndarray, classes: list[str], clusters: np.ndarray | None = None,
                         n_resamples: int = 500, level: float = 0.95, seed: int = 0,
                         spacing: tuple[float, ...] | None = None, min_pixels: int = 1) -> dict:
    """Everything at once from the truth masks (N, H, W) and softmax output (N, K, H, W): the pixel
    metrics of :func:`aggregate`, ``"cases"`` (per-case lists, None where undefined) and
    ``"image_level"`` (:func:`image_level`, an image called positive from ``min_pixels`` predicted
    foreground pixels)."""
    probs = np.asarray(probs)
    pred = probs.argmax(1)
    cases = case_metrics(truth, pred, classes, spacing)
    out = aggregate(cases, classes, clusters, n_resamples, level, seed)
    out["cases"] = {m: [[None if not np.isfinite(x) else float(x) for x in row] for row in cases[m]] for m in METRICS}
    present, score, predicted = lesion_view(truth, probs, min_pixels)
    out["image_level"] = image_level(present, score, predicted, clusters, n_resamples, level, seed)
    return out
