"""Segmentation masks: read as class-index maps, and found beside (or for) their images.

A mask is an integer (rows, cols) map of class indices, 0 = background, k = the k-th class of the
project's ``segmentation.classes``:

* **PNG / TIFF** (PIL): the grey values are the class indices, except a two-valued 0/255 mask (the
  usual binary export of drawing tools), which reads as 0/1.  Colour masks are read as grey.
* **NIfTI** (nibabel, ``.nii``/``.nii.gz``): a 2D image, or a 3D one with a single slice (squeezed).
  NIfTI stores its first axis as x (the image's columns, as ITK, ITK-SNAP and 3D Slicer write it),
  so the array is transposed to rows x columns, the way the image is displayed.
* **DICOM-SEG** (highdicom, :func:`seg_masks`): one label map per referenced source instance,
  keyed by its SOPInstanceUID; the segment number is the class index, and where segments overlap
  the higher number wins.

Ingest finds a plain image's mask with :func:`mask_for` (in a mask folder mirroring the source's
relative paths, or beside the image as ``<stem><suffix>.<ext>``); files :func:`is_mask_name`
recognises are masks, never samples.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

# a path without its suffix, .nii.gz as one (the volume readers' own)
from haven.sources.bids import stem as path_stem

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# the forms a mask file takes, in the order looked for (the first that exists wins)
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".nii.gz", ".nii")


def mask_suffix(name: str) -> str:
    """The mask format suffix of a file name (``.nii.gz`` as one), "" when it is no mask format."""
    low = name.lower()
    return next((s for s in MASK_SUFFIXES if low.endswith(s)), "")


def is_mask_name(rel: str, suffix: str) -> bool:
    """Whether a source file beside the images is a mask: ``<stem><suffix>.<mask format>``."""
    ext = mask_suffix(rel)
    return bool(suffix) and bool(ext) and path_stem(rel).endswith(suffix) and len(PurePosixPath(path_stem(rel)).name) > len(suffix)


def mask_for(rel: str, source: Path, masks: Path | None = None, suffix: str = "_mask") -> Path | None:
    """The mask file of the image at ``rel`` (relative to ``source``): ``<masks>/<rel without
    suffix>.<ext>`` when a mask folder is given, else ``<source>/<rel stem><suffix>.<ext>``; None
    when there is none (the image is then all background)."""
    stem = path_stem(rel)
    base = Path(masks) / stem if masks is not None else Path(source) / (stem + suffix)
    for ext in MASK_SUFFIXES:
        candidate = base.with_name(base.name + ext)
        if candidate.is_file():
            return candidate
    return None


def read_mask(path: str | Path) -> np.ndarray:
    """The mask file at ``path`` (PNG, TIFF or NIfTI) as an int64 (rows, cols) class-index map.
    Raises ValueError naming the file and the problem."""
    path = Path(path)
    ext = mask_suffix(path.name)
    try:
        if ext.startswith(".nii"):
            mask = _read_nifti(path)
        elif ext:
            mask = _read_picture(path)
        else:
            raise ValueError("not a mask format (PNG, TIFF or NIfTI)")
    except ValueError as e:
        raise ValueError(f"mask {path.name}: {e}") from None
    except Exception as e:
        raise ValueError(f"mask {path.name} cannot be read ({type(e).__name__}): re-export it as an "
                         "8-bit PNG of class indices") from None
    return mask


def _read_picture(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
            im = im.convert("L")  # colour: its grey value
        a = np.asarray(im)
    if a.ndim != 2:
        raise ValueError(f"a mask must be one 2D plane, got shape {a.shape}")
    return _indices(a)


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    a = np.asanyarray(nib.load(str(path)).dataobj)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"a 2D mask must have one slice, got shape {a.shape}: give one mask per image")
    return _indices(a.T)  # NIfTI (x, y) = (column, row) -> (row, column)


def _indices(a: np.ndarray) -> np.ndarray:
    """Class indices from a mask's values: integers >= 0; a 0/255 mask is binary (0/1)."""
    if a.dtype == bool:
        return a.astype(np.int64)
    if a.size and (np.any(a < 0) or not np.all(np.equal(np.mod(a, 1), 0))):
        raise ValueError("a mask must hold non-negative integer class indices")
    a = a.astype(np.int64)
    if a.size and a.max() == 255 and np.all((a == 0) | (a == 255)):
        a = a // 255
    return a


def seg_masks(path: str | Path) -> dict[str, np.ndarray]:
    """A DICOM-SEG file as {referenced source SOPInstanceUID: int64 (rows, cols) label map}
    (segment number = class index; overlapping segments: the higher number wins).  Raises
    ValueError naming the file."""
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
        numbers = sorted(int(n) for n in seg.segment_numbers)
        sops = [sop for _, _, sop in seg.get_source_image_uids()]
        out = {}
        for sop in sops:
            try:
                planes = seg.get_pixels_by_source_instance(source_sop_instance_uids=[sop], segment_numbers=numbers,
                                                           combine_segments=False)
            except ValueError:  # referenced, but its empty frames were omitted: all background
                out[str(sop)] = np.zeros((int(seg.Rows), int(seg.Columns)), dtype=np.int64)
                continue
            # (1, rows, cols, segments): BINARY 0/1, FRACTIONAL scaled to [0, 1]
            present = np.asarray(planes[0]) > 0.5
            label = np.zeros(present.shape[:2], dtype=np.int64)
            for i, number in enumerate(numbers):  # ascending: a higher segment overwrites a lower one
                label[present[..., i]] = number
            out[str(sop)] = label
    except Exception as e:
        # the class only: highdicom's messages may quote UIDs
        raise ValueError(f"DICOM-SEG {path.name} cannot be read ({type(e).__name__}): check that it is a "
                         "Segmentation Storage object whose frames reference their source instances") from None
    return out


def clean_mask(path: str | Path) -> tuple[bytes, str]:
    """The mask at ``path`` re-encoded as its pixels only, and the output's suffix: PNG and TIFF
    as a PNG of class indices (8-bit, 16-bit past 255 classes) without a single metadata chunk,
    NIfTI as a gzipped NIfTI-1 with a fresh header (no description, auxiliary file, intent or
    database name, no extensions; the affine kept: it is geometry) and a zero gzip time stamp,
    so that the same mask gives the same bytes.  Raises ValueError as :func:`read_mask`."""
    import io

    path = Path(path)
    mask = read_mask(path)  # validates, and gives the class indices written below
    if mask_suffix(path.name).startswith(".nii"):
        return _clean_nifti(path), ".nii.gz"
    from PIL import Image

    if mask.max(initial=0) > 65535:
        raise ValueError(f"mask {path.name}: class index {mask.max()} too large for a mask")
    im = Image.fromarray(mask.astype(np.uint8)) if mask.max(initial=0) <= 255 else \
        Image.fromarray(mask.astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _clean_nifti(path: Path) -> bytes:
    """A NIfTI mask as a gzipped NIfTI-1 of its class indices, the file's own axis order and affine,
    a fresh header (no text, no extension) and a zero gzip time stamp."""
    import gzip

    import nibabel as nib

    src = nib.load(str(path))
    data = _indices(np.asanyarray(src.dataobj))
    clean = nib.Nifti1Image(data.astype(np.uint8 if data.max(initial=0) <= 255 else np.uint16), src.affine)
    return gzip.compress(clean.to_bytes(), mtime=0)


def read_volume_mask(path: str | Path) -> np.ndarray:
    """A volume's NIfTI mask as an int64 (X, Y, Z) class-index map, in the file's own axis order
    (a volume's mask lies on its volume's voxel grid).  Raises ValueError naming the file."""
    import nibabel as nib

    path = Path(path)
    if not mask_suffix(path.name).startswith(".nii"):
        raise ValueError(f"mask {path.name}: a volume's mask must be NIfTI (.nii or .nii.gz) on the volume's grid")
    try:
        a = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:
        raise ValueError(f"mask {path.name} cannot be read ({type(e).__name__}): re-export it as a NIfTI of "
                         "class indices") from None
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"mask {path.name}: a volume's mask must be 3-D, got shape {a.shape}")
    return _indices(a)


def clean_volume_mask(path: str | Path) -> bytes:
    """A volume's NIfTI mask re-encoded as its class indices only (see :func:`clean_mask`)."""
    read_volume_mask(path)  # validates
    return _clean_nifti(Path(path))

