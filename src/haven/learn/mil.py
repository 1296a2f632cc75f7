"""Attention-based multiple-instance learning over cached tile features (Ilse et al. 2018).

A slide is a bag of tile feature vectors (:mod:`haven.learn.slidefeatures`) with one label.
:class:`AttentionMIL` projects each tile, scores it with gated attention
(``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``), pools the tiles by those weights and
puts a linear head of ``out`` logits on the pooled vector: whatever width the project's Task asks
(classes for single-label, K-1 for ordinal CORN, one per label for multi-label), so the Task's
loss and ``scores`` apply unchanged.  The attention weights are returned too, for the heatmap.

Why not MONAI's ``monai.networks.nets.MILModel(num_classes, mil_mode="att", pretrained=True,
backbone=None, backbone_num_features=None, trans_blocks=4, trans_dropout=0.0)``: it takes images
``[B, N, C, H, W]`` and runs its own backbone (a torchvision ResNet50 by default) over every tile
at every step, which makes each epoch cost a feature extraction of the cohort; here the features
are computed once and cached.  Its modes ("mean", "max", "att": non-gated tanh attention with a
2048-wide hidden layer, "att_trans"/"att_trans_pyramid": a transformer over the tiles) could be
reached through ``calc_head`` on features, but that has no padding mask (bags of different
sizes cannot be batched), does not return the attention, and ``__init__`` still builds a backbone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["AttentionMIL", "pad_bags", "train_mil"]


class AttentionMIL(nn.Module):
    """Gated attention pooling: (N, F) or (B, N, F) [+ mask (B, N), True = a real tile] → (logits
    (B, out), attention (B, N)); padded tiles get exactly zero attention."""

    def __init__(self, in_features: int, out: int, hidden: int = 128, attention: int = 64, dropout: float = 0.1):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attention)
        self.attn_u = nn.Linear(hidden, attention)
        self.attn_w = nn.Linear(attention, 1)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 2:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.reshape(1, -1)
        h = self.project(x)
        score = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        if mask is not None:
            score = score.masked_fill(~mask.bool(), float("-inf"))
        attn = torch.softmax(score, dim=1)
        attn = torch.nan_to_num(attn, nan=0.0)  # a bag of padding only: all -inf, no tile to attend
        pooled = torch.bmm(attn.unsqueeze(1), h).squeeze(1)
        return self.head(pooled), attn


def pad_bags(bags: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of (n_i, F) → zero-padded (B, max n, F) float32 and the mask (B, max n) of real tiles."""
    n = max((len(b) for b in bags), default=0)
    f = int(np.asarray(bags[0]).shape[1]) if bags else 0
    x = torch.zeros(len(bags), n, f)
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        t = torch.as_tensor(np.asarray(b), dtype=torch.float32)
        x[i, : len(t)] = t
        mask[i, : len(t)] = True
    return x, mask


def _default_width(targets: np.ndarray) -> int:
    """Head width when not given: the columns of 2-D targets (multi-label), else classes (max + 1)."""
    return int(targets.shape[1]) if targets.ndim == 2 else int(targets.max()) + 1


def train_mil(bags: list, targets, loss: nn.Module, epochs: int = 30, lr: float = 1e-3, seed: int = 0,
              out: int | None = None, batch_size: int = 16, **model_kw) -> AttentionMIL:
    """An :class:`AttentionMIL` fitted to ``bags`` (each (n_i, F)) and their ``targets`` with ``loss``
    (``loss(logits, targets)``), Adam, shuffled padded mini-batches; deterministic for ``seed``."""
    targets = np.asarray(targets)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AttentionMIL(int(np.asarray(bags[0]).shape[1]), out or _default_width(targets), **model_kw)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    y_all = torch.as_tensor(targets)
    y_all = y_all.float() if y_all.is_floating_point() or targets.ndim == 2 else y_all.long()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(bags), generator=gen)
        for start in range(0, len(bags), batch_size):
            idx = order[start:start + batch_size]
            x, mask = pad_bags([bags[int(i)] for i in idx])
            logits, _ = model(x, mask)
            opt.zero_grad()
            loss(logits, y_all[idx]).backward()
            opt.step()
    return model.eval()
