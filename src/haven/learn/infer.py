"""Inference over a whole split: the model's scores (the task's reading of its logits) in stored order.

The task is passed in (anything with ``scores(logits)``), not looked up here, so the stages
that only run a trained model need not import the task registry.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from haven.learn.data import ZarrSplit, normalize


def autocast(dev: torch.device, amp: str):
    """Mixed precision on GPU only (``amp`` is the train setting: bf16, fp16 or off)."""
    enabled = dev.type == "cuda" and amp in ("bf16", "fp16")
    return torch.autocast(dev.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16, enabled=enabled)


# volumes per batch for a 3D model: a batch of 128 volumes of 96^3 would be ~450 MB of input alone
VOLUME_BATCH = 4


def sliding_window(model: nn.Module, x: torch.Tensor, roi, amp: str, batch: int = VOLUME_BATCH,
                   overlap: float = 0.25) -> torch.Tensor:
    """MONAI ``sliding_window_inference`` of normalized volumes ``x`` (N, C, D, H, W): logits
    (N, K, D, H, W) float32, Gaussian-blended windows of ``roi``.  Validation
    (:mod:`haven.learn.net3d`), evaluate and predict all call this one: they must read a volume the
    same way."""
    from monai.inferers import sliding_window_inference

    with autocast(x.device, amp):
        out = sliding_window_inference(x, list(roi), batch, model, overlap=overlap, mode="gaussian")
    return torch.as_tensor(out).float()


def logits_of(model: nn.Module, x: torch.Tensor, amp: str, patch=None) -> torch.Tensor:
    """The model's logits on a normalized batch: a 3D segmentation (``patch`` given, 5-D input)
    through sliding windows of the training patch, anything else in one forward pass."""
    if x.ndim == 5 and patch is not None and list(patch) != list(x.shape[-3:]):
        return sliding_window(model, x, patch, amp)
    with autocast(x.device, amp):
        return model(x)


@torch.no_grad()
def predict(model: nn.Module, split: ZarrSplit, task, amp: str, batch_size: int = 128, patch=None
            ) -> tuple[np.ndarray, np.ndarray]:
    """``task.scores`` of the model's outputs and the stored targets for a whole split, in stored
    order: (N, K) or a segmentation's (N, K, H, W) / (N, K, D, H, W), float32.  A volume store
    (5-D images) goes :data:`VOLUME_BATCH` volumes at a time; ``patch`` (model.pt's ``patch``: the
    training patch of a 3D segmentation, None for a classifier of whole volumes) is the
    sliding-window roi."""
    dev = next(model.parameters()).device
    model.eval()
    if len(split.images.shape) == 5:
        batch_size = min(batch_size, VOLUME_BATCH)
    scores, labels = [], []
    for x, y in split.batches(batch_size, shuffle=False):
        x = normalize(x.to(dev, non_blocking=True), split.mean, split.std)
        logits = logits_of(model, x, amp, patch)
        scores.append(task.scores(logits).float().cpu().numpy())
        labels.append(y.numpy())
    if not scores:
        return np.zeros((0, len(split.classes))), np.zeros(0, dtype=np.int64)
    return np.concatenate(scores), np.concatenate(labels)
