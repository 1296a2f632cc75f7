"""2D segmentation: a class per pixel, learned from masks (lesions on CT slices, structures in photos).

The targets are the masks preprocess stores beside the images (``masks``, uint8 class indices,
``segmentation.classes[k]`` for value k, background first); the manifest's label (a label table
stays optional) only stratifies the patient split.  The network is a U-Net on the same offline
timm encoders the classifiers use (:mod:`haven.learn.segnet`), the loss MONAI's Dice +
cross-entropy.  Scores are softmax probabilities (N, K, H, W); the validation metric is the
foreground Dice over the whole split (pixels pooled: small lesions weigh as much as their pixels,
and an image without foreground adds no 0/0 term).  The evaluation (pixel metrics per case with
CIs, the image-level "structure present" view, overlays) is :mod:`haven.trust.segmentation`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from haven.learn.tasks.base import Task


class Segmentation(Task):
    name = "segmentation"
    val_metric = "val_dice"
    test_metric = "dice_present"  # Dice over the images that show a structure (an empty one scores 1 either way)
    targets = "masks"  # preprocess stores masks (N, H, W) as the targets, not one label per sample
    needs_labels = False  # an image without a label row is fine; one without a mask is all background
    reports_every_class = True

    @property
    def class_names(self) -> list[str]:
        return list(self.options.get("classes") or ["background", "lesion"])

    @property
    def threshold_pixels(self) -> int:
        return int(self.options.get("threshold_pixels") or 10)

    def classes(self, labels: pd.Series) -> list[str]:
        return self.class_names

    def encode(self, labels: pd.Series, classes: list[str]) -> np.ndarray:
        # placeholder image-level targets; preprocess overwrites them with "any foreground" from the masks
        return np.zeros(len(labels), np.int64)

    def counts(self, labels: pd.Series, classes: list[str]) -> dict:
        labels = labels[labels.astype(str).str.strip() != ""]
        return labels.value_counts().sort_index().to_dict()

    def describe(self, classes: list[str]) -> str:
        return f"a 2D segmentation of {', '.join(classes[1:])} per pixel (U-Net; classes {', '.join(classes)})"

    def network(self, backbone: str, width: int, weights, in_chans: int, dims: int = 2) -> nn.Module:
        if dims == 3:  # volumes: a MONAI 3D U-Net trained from scratch (haven.learn.net3d)
            from haven.learn.net3d import build_unet3d

            return build_unet3d(backbone, width, weights=weights, in_chans=in_chans)
        from haven.learn.segnet import build_segmentation_model

        return build_segmentation_model(backbone, width, weights=weights, in_chans=in_chans)

    def outputs(self, classes: list[str], hp: dict | None = None) -> int:
        return len(classes)

    def loss(self, targets: np.ndarray, classes: list[str], hp: dict) -> nn.Module:
        from haven.learn.segnet import segmentation_loss

        return segmentation_loss(classes, hp)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def logits(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        return torch.log(scores.clamp_min(1e-12))

    def val_metrics(self, targets: np.ndarray, scores: np.ndarray) -> dict:
        if len(targets) == 0:
            return {}
        pred = scores.argmax(1)
        t = targets.astype(np.int64)
        truth_p = np.take_along_axis(scores, t[:, None], 1)
        out = {"val_loss": float(-np.log(np.clip(truth_p, 1e-12, None)).mean())}
        dice = [pooled_dice(t == k, pred == k) for k in range(1, scores.shape[1])]
        out["val_dice"] = float(np.nanmean(dice)) if not np.isnan(dice).all() else 0.0
        return out

    def metrics(self, targets: np.ndarray, scores: np.ndarray, classes: list[str], settings: dict) -> dict:
        from haven.trust.segmetrics import segmentation_metrics

        return segmentation_metrics(targets, scores, classes)

    def masks(self, scores: np.ndarray) -> np.ndarray:
        """The predicted class map (N, H, W) of the scores."""
        return np.asarray(scores).argmax(1).astype(np.uint8)

    def prediction_columns(self, classes: list[str]) -> list[str]:
        fg = classes[1:]
        return [f"p_{c}" for c in fg] + [f"{c}_pixels" for c in fg] + ["predicted"]

    def evaluate(self, ctx) -> dict:
        from haven.trust import segmentation

        return segmentation.evaluate(ctx)

    def flat_metrics(self, metrics: dict) -> dict[str, float]:
        from haven.trust import segmentation

        return segmentation.flat_metrics(metrics)

    def rows(self, scores: np.ndarray, evaluation: dict, classes: list[str]) -> list[dict]:
        """Per image: ``p_<class>`` (the class's highest pixel probability), ``<class>_pixels`` (its
        predicted pixels, at the model's input size) and ``predicted`` (the classes with at least ``threshold_pixels`` pixels,
        joined by ``+``, or ``none``); the mask itself is :meth:`masks`."""
        if not len(scores):
            return []
        pred = self.masks(scores)
        out = []
        for p, m in zip(scores, pred):
            row = {f"p_{c}": float(p[k].max()) for k, c in enumerate(classes) if k}
            pixels = {c: int((m == k).sum()) for k, c in enumerate(classes) if k}
            row.update({f"{c}_pixels": n for c, n in pixels.items()})
            present = [c for c, n in pixels.items() if n >= self.threshold_pixels]
            row["predicted"] = "+".join(present) or "none"
            out.append(row)
        return out


def pooled_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two boolean arrays over all their pixels; NaN when both are empty."""
    denom = int(truth.sum()) + int(pred.sum())
    return float("nan") if denom == 0 else 2.0 * float(np.logical_and(truth, pred).sum()) / denom
