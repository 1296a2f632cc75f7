"""Test-time augmentation: the model's scores averaged over a few label-preserving views.

A view is the identity, a horizontal or vertical flip, or a shift by ``shift`` pixels along
either axis (edges repeated, not wrapped: a wrapped skull would put bone where none is).  Which
views apply is the project's ``tta`` setting, off by default: a flip is wrong for data where
left and right differ in meaning (a flipped digit 2 is no 2), so it is asked for, not assumed.
Used by evaluate (the test metrics with and without it) and by prediction.  A per-pixel output (a
segmentation's) is moved back onto the input before averaging (:data:`INVERSE`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def views(spec: dict | None) -> list[str]:
    """The names of the views ``spec`` (the ``tta`` setting) asks for, the identity first."""
    if not spec or not spec.get("enabled"):
        return ["identity"]
    out = ["identity"]
    if spec.get("hflip"):
        out.append("hflip")
    if spec.get("vflip"):
        out.append("vflip")
    if int(spec.get("shift") or 0) > 0:
        out += ["left", "right", "up", "down"]
    return out


def _shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    # pad with the edge and crop back: a shift that invents no black border
    p = max(abs(dx), abs(dy))
    h, w = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


# the view that undoes each view (a flip is its own inverse); shifting back repeats the edge the
# shift cut off, which for a per-pixel map is the nearest estimate there is
INVERSE = {"identity": "identity", "hflip": "hflip", "vflip": "vflip", "left": "right", "right": "left",
           "up": "down", "down": "up"}


def view(x: torch.Tensor, name: str, shift: int) -> torch.Tensor:
    """One view of a normalized float batch (N, C, H, W)."""
    if name == "identity":
        return x
    if name == "hflip":
        return torch.flip(x, dims=(-1,))
    if name == "vflip":
        return torch.flip(x, dims=(-2,))
    dx, dy = {"left": (-shift, 0), "right": (shift, 0), "up": (0, -shift), "down": (0, shift)}[name]
    return _shifted(x, dx, dy)


def scores(model, x: torch.Tensor, task, spec: dict | None) -> torch.Tensor:
    """``task.scores`` of the model on ``x``, averaged over the views of ``spec`` (the mean of the
    probabilities, not of the logits: what a clinician reads is a probability)."""
    names = views(spec)
    shift = int((spec or {}).get("shift") or 0)
    total = None
    for name in names:
        s = task.scores(model(view(x, name, shift))).float()
        if s.ndim == 4:  # scores per pixel (a segmentation): each view's map moved back onto the input
            s = view(s, INVERSE[name], shift)
        total = s if total is None else total + s
    return total / len(names)
