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


@torch.no_grad()
def predict(model: nn.Module, split: ZarrSplit, task, amp: str, batch_size: int = 128
            ) -> tuple[np.ndarray, np.ndarray]:
    """``task.scores`` of the model's outputs and the stored targets for a whole split, in stored order."""
    dev = next(model.parameters()).device
    model.eval()
    scores, labels = [], []
    for x, y in split.batches(batch_size, shuffle=False):
        x = normalize(x.to(dev, non_blocking=True), split.mean, split.std)
        with autocast(dev, amp):
            logits = model(x)
        scores.append(task.scores(logits).cpu().numpy())
        labels.append(y.numpy())
    if not scores:
        return np.zeros((0, len(split.classes))), np.zeros(0, dtype=np.int64)
    return np.concatenate(scores), np.concatenate(labels)
