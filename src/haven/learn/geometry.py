"""Where a sample's pixels come from in its file: the centre crop preprocess takes before resizing,
shared by images and their masks so that a mask lies exactly on its image."""

from __future__ import annotations

import numpy as np


def square(a: np.ndarray) -> np.ndarray:
    """Centre-crop the longer side so that resizing keeps the aspect ratio."""
    h, w = a.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return a[..., top:top + s, left:left + s]


def fit_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A class map (H, W) → uint8 (size, size) with the image's crop and nearest interpolation (a
    resampled class stays a class; no blend of background and lesion into a third value)."""
    from PIL import Image

    m = square(np.asarray(mask))
    if m.ndim != 2:
        raise ValueError(f"a mask must be one 2D class map, got shape {m.shape}")
    if m.max(initial=0) > 255 or m.min(initial=0) < 0:
        raise ValueError(f"mask values must be class indices 0..255, found {m.min()}..{m.max()}")
    img = Image.fromarray(m.astype(np.uint8), mode="L")
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST), dtype=np.uint8)


def unfit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of :func:`fit_mask`: a (size, size) class map back onto a file of ``shape``
    (rows, cols): resized (nearest) to the centre square it came from and placed there; the
    cropped-off sides are background (the model never saw them)."""
    from PIL import Image

    h, w = int(shape[0]), int(shape[1])
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    out = np.zeros((h, w), np.uint8)
    img = Image.fromarray(np.asarray(mask, np.uint8), mode="L")
    out[top:top + s, left:left + s] = np.asarray(img.resize((s, s), Image.Resampling.NEAREST))
    return out
