"""Per-sample random augmentation of a batch of volumes (N, C, D, H, W), with their masks.

The 2D :func:`haven.learn.data.augment` in three dimensions, read from the same ``train.augment``
settings: one affine grid per volume (``affine_grid``/``grid_sample`` in 3D, on the batch's own
device, seeded by the caller's generator) made of flips, a small rotation about each axis
(``rotate`` degrees at most), an isotropic scale and a shift, then brightness/contrast jitter of
the images.  Masks move with their images on the same grid with nearest sampling (a class stays a
class), padded with background.  Written with torch rather than MONAI's ``RandAffined`` because
MONAI's random transforms act on one sample at a time on the CPU, and training batches live on the
device here.

Axes (the store's (D, H, W) are RAS x, y, z): ``hflip`` flips left-right (D), the symmetry of a
head; ``vflip`` flips superior-inferior (W).  The anterior-posterior axis is never flipped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(N, 3) angles about the grid's x, y, z axes → (N, 3, 3) rotation matrices."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, 1) for r in rows], 1)

    rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def _grid(x: torch.Tensor, aug: dict, strength: float, rand) -> torch.Tensor:
    n = x.shape[0]
    angles = (rand(n, 3) * 2 - 1) * math.radians(aug["rotate"]) * strength
    lo, hi = aug["scale"]
    scale = 1 + ((lo - 1) + rand(n) * (hi - lo)) * strength
    shift = (rand(n, 3) * 2 - 1) * 2 * aug["translate"] * strength
    # grid coordinates are (x, y, z) = (W, H, D): vflip is the first, hflip (left-right, D) the last
    flips = torch.stack([torch.where(rand(n) < (0.5 if aug["vflip"] else 0.0), -1.0, 1.0),
                         torch.ones(n),
                         torch.where(rand(n) < (0.5 if aug["hflip"] else 0.0), -1.0, 1.0)], 1)
    linear = _rotation(angles) / scale[:, None, None] * flips[:, None, :]
    theta = torch.cat([linear, shift[:, :, None]], 2).to(x.device, x.dtype)
    return F.affine_grid(theta, list(x.shape), align_corners=False)


def augment_volumes(x: torch.Tensor, masks: torch.Tensor | None, aug: dict, strength: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augmented float volumes (N, C, D, H, W) and masks (N, D, H, W) moved with them (None: no
    masks).  ``strength`` scales every magnitude; 0 (or no ``aug``) returns both unchanged."""
    if not aug or strength <= 0:
        return x, masks

    def rand(*shape):  # drawn on the CPU: the same numbers whatever the device
        return torch.rand(*shape, generator=generator)

    n = x.shape[0]
    grid = _grid(x, aug, strength, rand)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, c = aug["brightness"] * strength, aug["contrast"] * strength
    if b or c:
        mean = out.mean(dim=(1, 2, 3, 4), keepdim=True)
        gain = (1 + (rand(n, 1, 1, 1, 1) * 2 - 1) * c).to(out.device, out.dtype)
        bias = ((rand(n, 1, 1, 1, 1) * 2 - 1) * b).to(out.device, out.dtype)
        out = (out - mean) * gain + mean + bias
    if masks is None:
        return out, None
    moved = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, moved[:, 0].round().to(masks.dtype)
