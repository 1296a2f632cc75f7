"""Plain images (PNG, JPEG, TIFF, BMP), read by PIL: no header fields beyond their size.

An image is taken by its name: the patient is the file's path without its suffix (a label table
may give one), and nothing in it is recorded as identifying (its pixels are the anonymize
stage's and the audit's concern).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from haven.sources.base import BY_NAME, HEADER_FIELDS, NO, Reader

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
# signature → (format, the suffix to rename a misnamed file to)
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG", ".png"), (b"\xff\xd8\xff", "JPEG", ".jpg"),
          (b"II*\x00", "TIFF", ".tif"), (b"MM\x00*", "TIFF", ".tif"), (b"BM", "BMP", ".bmp"))


class ImageReader(Reader):
    kind = "image"
    description = "a supported image (png, jpg, jpeg, tif, tiff, bmp)"
    suffixes = SUFFIXES

    def recognise(self, head: bytes, suffix: str, others: frozenset[str]) -> int:
        return BY_NAME if suffix in SUFFIXES else NO

    def misnamed(self, head: bytes, suffix: str) -> str | None:
        for magic, kind, ext in _MAGIC:
            if head.startswith(magic):
                return f"a {kind} image with a {suffix or 'missing'} extension: rename it to {ext} to use it"
        return None

    def header(self, path: Path, rel: str, fh, head: bytes, *, check_pixels: bool):
        with _open(path) as im:
            im.verify()
        with _open(path) as im:  # verify() leaves the image unusable: reopen and decode fully
            im.load()
            cols, rows = im.size
        row = dict.fromkeys(HEADER_FIELDS, "")
        row.update(patient_id=str(PurePosixPath(rel).with_suffix("")), rows=rows, cols=cols)
        return row, []

    def pixels(self, path: Path, mode: str, windows: list[dict]) -> np.ndarray:
        """gray or rgb as asked; ``ct`` (Hounsfield windows) reads an image as gray: it has no HU."""
        with _open(path) as im:
            im = im.convert("RGB" if mode == "rgb" else "L")
            a = np.asarray(im, dtype=np.float32) / 255.0
        return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]


def _open(path: Path):
    from PIL import Image

    return Image.open(path)
