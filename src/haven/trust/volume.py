"""What the evaluate stage does differently for a volume project (a test store with 5-D images
(N, C, D, H, W), model.pt ``dims: 3``): the few settings it caps, why test-time augmentation is
off, and the mid-slice montage every 3D figure is drawn from.

Why caps: a 3D network's forward and backward pass on a whole volume costs what a batch of
hundreds of 2D images does (a MONAI DenseNet-121 on four 48^3 volumes: ~7 s on one CPU core), and
Integrated Gradients and PGD take tens of them per volume.  The evaluate stage runs on the CPU, so a
volume project explains and attacks fewer volumes with fewer steps (:func:`capped`); each capped
number is written to metrics.json (``volume_limits``) beside the settings asked for, so the report
never shows a smaller sample as the configured one.

Slices: the store's (D, H, W) are RAS x, y, z (:mod:`haven.learn.volumes`).  A figure shows the
middle sagittal (x), coronal (y) and axial (z) slice side by side, each turned so that superior
(sagittal, coronal) or anterior (axial) is up; the patient's right is on the right of the coronal
and axial slices (neurological convention).
"""

from __future__ import annotations

import numpy as np

# the caps on one CPU core (see the module docstring); a setting below its cap is kept
CAPS = {"explain_per_class": 1, "ig_steps": 8, "randomization_samples": 2, "attack_samples": 4, "pgd_steps": 5}
TTA_SKIPPED = ("test-time augmentation is not applied to a volume model: its views (2D flips and shifts of "
               "haven.learn.tta) are defined on slices, and a left-right flip of a brain volume changes which "
               "hemisphere a finding is in")
SLICES = "mid slices: sagittal | coronal | axial"


def is_volume(split) -> bool:
    """Whether ``split`` holds volumes (N, C, D, H, W) rather than images (N, C, H, W)."""
    return len(split.images.shape) == 5


def spacing(split) -> list[float] | None:
    """The voxel size in mm the store's volumes were resampled to (None: unknown or 2D)."""
    sp = dict(split.group.attrs).get("spacing") if is_volume(split) else None
    return [float(v) for v in sp] if sp is not None and len(sp) == 3 else None


def capped(settings: dict, volume: bool) -> tuple[dict, dict]:
    """``settings`` with :data:`CAPS` applied for a volume project (unchanged for 2D), and the
    record of what was capped ({name: {"asked": a, "used": b}})."""
    if not volume:
        return settings, {}
    out, record = dict(settings), {}
    for name, cap in CAPS.items():
        asked = int(settings[name])
        if asked > cap:
            out[name] = cap
            record[name] = {"asked": asked, "used": cap}
    return out, record


def _pad(a: np.ndarray, height: int) -> np.ndarray:
    pad = [(0, 0)] * (a.ndim - 2) + [(0, height - a.shape[-2]), (0, 0)]
    return np.pad(a, pad)


def mid_slices(a: np.ndarray, gap: int = 2) -> np.ndarray:
    """(..., D, H, W) → (..., rows, cols): the middle sagittal, coronal and axial slices side by
    side (see the module docstring for their orientation), zero-padded to one height and
    separated by ``gap`` zero columns.  Works alike for images (N, C, D, H, W), masks and maps."""
    a = np.asarray(a)
    d, h, w = a.shape[-3:]
    views = [a[..., d // 2, :, :], a[..., :, h // 2, :], a[..., :, :, w // 2]]  # (y,z), (x,z), (x,y)
    views = [np.rot90(v, axes=(-2, -1)) for v in views]  # the last axis (z or y) becomes the rows, top first
    height = max(v.shape[-2] for v in views)
    blank = np.zeros(a.shape[:-3] + (height, gap), a.dtype)
    parts = []
    for v in views:
        parts += [_pad(v, height), blank]
    return np.ascontiguousarray(np.concatenate(parts[:-1], axis=-1))
