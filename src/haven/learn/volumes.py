"""One NIfTI volume → the array a 3D model sees, and a predicted mask back onto the file's grid.

The 3D twin of :mod:`haven.learn.geometry` plus the decoding half of :mod:`haven.learn.preprocess`,
built from MONAI dictionary transforms (:func:`volume_transforms`): load (nibabel), channel first,
orientation to RAS, resampling to ``spacing_mm`` (image bilinear, mask nearest, so a class stays a
class), intensity, a crop to the image's foreground (the mask follows), and a centred pad/crop to
``size``.  The array axes (D, H, W) are MONAI's after the reorientation: the RAS axes x, y, z.

Intensity (``mode``):

* ``"mr"`` (``"gray"`` is taken as the same, for configs written for slices): the foreground is the
  non-zero voxels (skull-stripped and defaced volumes are zero outside the head or brain); its
  0.5th..99.5th percentiles are clipped and scaled to [0, 1], the background stays 0.  A z-score
  on the foreground first is left out on purpose: an affine map before a percentile
  min-max scaling cancels exactly, so it would change no stored value.  Percentiles rather than
  min/max so that a few hot voxels (vessels, artefacts) do not squash the brain into a narrow band;
  the trainer standardizes with the train split's mean/std as for slices.
* ``"ct"``: one channel per HU window ``{center, width}``: (HU - (center - width/2)) / width clipped
  to [0, 1], the formula of the DICOM reader's slices.  Windowed after resampling: the window is not
  linear, the resampling is.

:func:`load_volume` reads one volume (and its mask), never more, and returns with the arrays an
``info`` dict (JSON-able) that :func:`unfit_volume` needs to map a prediction back onto the file's
original grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.transforms import MapTransform  # the base of this module's own steps (MONAI is imported anyway)

# foreground percentiles of an MR volume clipped and scaled to [0, 1]
MR_PERCENTILES = (0.5, 99.5)
MR_MODES = ("mr", "gray")


def _triple(value, name: str, kind=float) -> list:
    values = [kind(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)]
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be one positive number or three, got {value!r}")
    return values


def volume_channels(mode: str, windows: list[dict]) -> int:
    """Channels of a preprocessed volume: 1 for MR, one per HU window for CT."""
    if mode in MR_MODES:
        return 1
    if mode == "ct":
        if not windows:
            raise ValueError("mode 'ct' needs at least one HU window {center, width} in preprocess.windows")
        return len(windows)
    raise ValueError(f"volumes take mode 'mr' or 'ct', not {mode!r}: set preprocess.mode in the project config")


class ForegroundPercentilesd(MapTransform):
    """MR intensity: the non-zero voxels' :data:`MR_PERCENTILES` → [0, 1], background 0."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            fg = img != 0
            values = img[fg].detach().cpu().numpy()
            if values.size == 0:  # an all-zero volume: nothing to scale, and no foreground to crop
                d[key] = img * 0
                continue
            lo, hi = np.percentile(values, MR_PERCENTILES)
            scaled = ((img - float(lo)) / max(float(hi - lo), 1e-6)).clamp(0.0, 1.0)
            d[key] = scaled * fg
        return d


class HUWindowsd(MapTransform):
    """CT intensity: one HU channel → one [0, 1] channel per window (center/width)."""

    def __init__(self, keys, windows: list[dict]):
        super().__init__(keys)
        self.windows = [(float(w["center"]), float(w["width"])) for w in windows]

    def __call__(self, data):
        import torch

        d = dict(data)
        for key in self.key_iterator(d):
            hu = d[key][:1]
            d[key] = torch.cat([((hu - (c - w / 2)) / w).clamp(0.0, 1.0) for c, w in self.windows])
        return d


class RecordGridd(MapTransform):
    """Keeps the resampled grid (shape, affine) of ``keys[0]`` under ``"grid"``: the frame in which
    :func:`load_volume` reports the crop/pad box."""

    def __call__(self, data):
        d = dict(data)
        img = d[self.keys[0]]
        d["grid"] = {"shape": [int(s) for s in img.shape[1:]], "affine": np.asarray(img.affine, float).tolist()}
        return d


def volume_transforms(spacing_mm: float | list[float], size: int | list[int], mode: str, windows: list[dict],
                      with_mask: bool):
    """The MONAI chain on keys ``"image"`` (and ``"mask"`` when ``with_mask``): a dict of file paths
    → float32 image (C, D, H, W) and uint8 mask (1, D, H, W), both MetaTensors."""
    import torch
    from monai.transforms import (CastToTyped, Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged,
                                  Orientationd, ResizeWithPadOrCropd, Spacingd)

    keys = ["image", "mask"] if with_mask else ["image"]
    volume_channels(mode, windows)
    intensity = ForegroundPercentilesd(["image"]) if mode in MR_MODES else HUWindowsd(["image"], windows)
    return Compose([
        LoadImaged(keys, reader="NibabelReader", image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        # border, not zeros, beyond the file's edge: a zero there would be water in a CT, not air
        Spacingd(keys, pixdim=_triple(spacing_mm, "spacing_mm"), mode=["bilinear", "nearest"][:len(keys)],
                 padding_mode="border", dtype=np.float32),
        RecordGridd(["image"]),
        intensity,
        # the default select_fn (value > 0, any channel): MR background is 0, CT air is 0 in every window
        CropForegroundd(keys, source_key="image", allow_smaller=True),
        ResizeWithPadOrCropd(keys, spatial_size=_triple(size, "size", int)),
        CastToTyped(keys, dtype=[torch.float32, torch.uint8][:len(keys)]),
    ])


def _header(path: Path, what: str):
    """The file's NIfTI header object (no voxels read); ValueError naming the file unless it is a
    readable 3-D NIfTI (a trailing 4th axis of length 1 counts as 3-D)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:
        raise ValueError(f"{path}: the {what} is not a readable NIfTI file ({type(e).__name__}: {e}); "
                         "convert it to .nii/.nii.gz (e.g. dcm2niix) or remove it from the source") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{path}: the {what} is a {type(img).__name__}, not NIfTI; convert it to .nii/.nii.gz "
                         "or remove it from the source")
    shape = tuple(int(s) for s in img.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise ValueError(f"{path}: the {what} has shape {shape}, but one 3-D volume is expected; split a 4-D "
                         "series into its volumes (e.g. fslsplit) or give a 3-D file")
    return img


def _check_mask_grid(image_hdr, mask_hdr, path, mask_path) -> None:
    if tuple(mask_hdr.shape[:3]) != tuple(image_hdr.shape[:3]) or not np.allclose(
            mask_hdr.affine, image_hdr.affine, atol=1e-3):
        raise ValueError(f"{mask_path}: the mask's grid (shape {tuple(mask_hdr.shape[:3])}) is not its image's "
                         f"({path.name}, shape {tuple(image_hdr.shape[:3])}, or another affine); write the mask "
                         "on the image's voxel grid (same shape and affine)")


def _info(hdr, out, grid: dict, fg: tuple, spacing_mm, size) -> dict:
    """What :func:`unfit_volume` needs, as plain lists: the original grid, and where the output's
    voxels lie in the resampled (RAS, ``spacing_mm``) grid: ``box`` start (negative where padded)
    and end, the output's voxel 0 sitting at ``start``."""
    import nibabel as nib

    out_affine = np.asarray(out.affine, float)
    start = np.rint(np.linalg.inv(np.asarray(grid["affine"])) @ out_affine[:, 3])[:3].astype(int)
    return {
        "shape": [int(s) for s in hdr.shape[:3]],
        "spacing": [float(z) for z in hdr.header.get_zooms()[:3]],
        "axcodes": list(nib.aff2axcodes(hdr.affine)),
        "affine": np.asarray(hdr.affine, float).tolist(),
        "resampled_shape": grid["shape"],
        "resampled_affine": grid["affine"],
        "foreground": {"start": [int(v) for v in np.asarray(fg[0])], "end": [int(v) for v in np.asarray(fg[1])]},
        "box": {"start": start.tolist(), "end": (start + np.asarray(out.shape[1:])).tolist()},
        "out_affine": out_affine.tolist(),
        "spacing_mm": _triple(spacing_mm, "spacing_mm"),
        "size": _triple(size, "size", int),
    }


def load_volume(path, mask_path=None, *, spacing_mm, size, mode: str, windows: list[dict]):
    """One volume file (and its mask) → image float32 (C, D, H, W) in [0, 1], mask uint8 (D, H, W)
    or None, and the ``info`` dict (original shape, spacing, orientation codes, affine, the
    resampled grid and the crop/pad box) that :func:`unfit_volume` maps a prediction back with.
    A file that is not a readable 3-D NIfTI raises ValueError naming it and the fix."""
    path = Path(path)
    hdr = _header(path, "image")
    data = {"image": str(path)}
    if mask_path is not None:
        mask_path = Path(mask_path)
        _check_mask_grid(hdr, _header(mask_path, "mask"), path, mask_path)
        data["mask"] = str(mask_path)
    chain = volume_transforms(spacing_mm, size, mode, windows, with_mask=mask_path is not None)
    try:
        out = chain(data)
    except Exception as e:
        # voxels are read only here: a truncated .nii.gz passes the header check and fails now
        cause = e.__cause__ or e  # MONAI wraps the failing transform's error
        names = path if mask_path is None else f"{path} (or its mask {mask_path})"
        raise ValueError(f"{names} cannot be read as a volume ({type(cause).__name__}: {cause}); the file is "
                         "damaged or truncated: re-export or re-copy it, or remove it from the source") from None
    image = np.ascontiguousarray(out["image"].numpy(), dtype=np.float32)
    mask = None if mask_path is None else np.ascontiguousarray(out["mask"].numpy()[0], dtype=np.uint8)
    fg = (out.get("foreground_start_coord", [0, 0, 0]), out.get("foreground_end_coord", out["grid"]["shape"]))
    return image, mask, _info(hdr, out["image"], out["grid"], fg, spacing_mm, size)


def unfit_volume(pred: np.ndarray, info: dict) -> np.ndarray:
    """The inverse of :func:`load_volume` for a class map: ``pred`` (D, H, W) on the output grid →
    uint8 on the file's original grid (shape ``info["shape"]``), undoing the pad/crop, spacing and
    orientation in one nearest-neighbour resampling between the two affines (MONAI's
    ``SpatialResample``, the resampling ``Spacing``'s own inverse runs).  ``Compose.inverse`` would
    need the MetaTensor's transform trace, which is neither JSON nor small; the affines in ``info``
    are all it uses.  Voxels the model never saw (cropped off) are background."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    pred = np.asarray(pred)
    if list(pred.shape) != list(info["size"]):
        raise ValueError(f"a prediction of shape {pred.shape} does not fit a volume preprocessed to {info['size']}")
    src = MetaTensor(torch.as_tensor(pred[None].astype(np.float32)),
                     affine=torch.as_tensor(np.asarray(info["out_affine"], float)))
    resample = SpatialResample(mode="nearest", padding_mode="zeros", dtype=np.float32)
    back = resample(src, dst_affine=torch.as_tensor(np.asarray(info["affine"], float)), spatial_size=info["shape"])
    return np.rint(np.asarray(back.detach().cpu().numpy()[0])).astype(np.uint8)
