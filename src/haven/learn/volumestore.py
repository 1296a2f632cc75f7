"""The Zarr store of a volume project (``preprocess.dims: 3``): one NIfTI volume per chunk.

:mod:`haven.learn.preprocess` splits, labels and schedules as for slices; this module holds what a
volume changes: the settings (``size`` a cube side or [D, H, W], ``spacing`` in mm, mode ``mr``/``ct``),
the arrays, and one volume fitted by :func:`haven.learn.volumes.load_volume` into its stored form.
The layout the training side reads:

* ``images`` uint8 (N, C, D, H, W) = round(image * 255), chunks (1, C, D, H, W): a worker holds
  one volume at a time, and a reader gets whole volumes;
* ``masks`` (segmentation only) uint8 (N, D, H, W), chunks (1, D, H, W), all background where a
  row has no mask file;
* ``info`` UTF-8 (N,): each the JSON of ``load_volume``'s info dict, what
  :func:`haven.learn.volumes.unfit_volume` maps a prediction back onto the file's grid with;
* group attrs as a 2-D store's plus ``dims: 3`` and ``spacing`` (3 floats); ``size`` is [D, H, W].
"""

from __future__ import annotations

import json

import numpy as np

VOLUME_KINDS = ("nifti",)
VOLUME_MODES = ("mr", "gray", "ct")


def is_volume(params: dict) -> bool:
    """Whether the settings are a volume project's (absent ``dims``: slices, as before)."""
    return int(params.get("dims", 2)) == 3


def volume_size(params: dict) -> list[int]:
    """[D, H, W] of a stored volume: ``size`` as a cube side, or three sides."""
    size = params["size"]
    return [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size)] * 3


def volume_spacing(params: dict) -> list[float]:
    spacing = params["spacing"]
    return [float(s) for s in spacing] if isinstance(spacing, (list, tuple)) else [float(spacing)] * 3


def channels(params: dict) -> int:
    from haven.learn.volumes import volume_channels

    return volume_channels(params["mode"], params["windows"])


def check_settings(params: dict, kinds, where) -> None:
    """ValueError naming ``where`` (the manifest) and the config fix when the settings do not fit
    the dimensionality, or a volume project's rows are not volumes."""
    if not is_volume(params):
        if isinstance(params["size"], (list, tuple)):
            raise ValueError(f"preprocess.size {params['size']} is a volume's [D, H, W]: slices take one side "
                             "(an integer), or set preprocess.dims: 3 for NIfTI volumes")
        if params["mode"] == "mr":
            raise ValueError("preprocess.mode 'mr' is for volumes: set preprocess.dims: 3, or mode gray for slices")
        return
    if params["mode"] not in VOLUME_MODES:
        raise ValueError(f"preprocess.mode {params['mode']!r} does not apply to volumes: use mr (or ct with "
                         "preprocess.windows) when preprocess.dims is 3")
    if int(params["slab"]):
        raise ValueError("preprocess.slab stacks neighbouring slices; a volume is whole already: set slab: 0 "
                         "when preprocess.dims is 3")
    other = sorted(set(kinds) - set(VOLUME_KINDS))
    if other:
        raise ValueError(f"{where}: preprocess.dims 3 reads NIfTI volumes, but the manifest also holds files of "
                         f"kind {', '.join(other)}: set preprocess.dims: 2 for images and DICOM slices, or give "
                         "the project a source of NIfTI volumes only")


def create_arrays(group, n: int, c: int, size: list[int], with_masks: bool) -> tuple:
    """The store's ``images`` and (segmentation) ``masks``, one volume per chunk."""
    from zarr.codecs import BloscCodec

    codec = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")  # as the 2-D store
    images = group.create_array("images", shape=(n, c, *size), chunks=(1, c, *size), dtype="uint8",
                                compressors=codec)
    masks = None
    if with_masks:
        masks = group.create_array("masks", shape=(n, *size), chunks=(1, *size), dtype="uint8",
                                   compressors=codec)
    return images, masks


def fit_volume(path, mask_path, params: dict) -> tuple[np.ndarray, np.ndarray | None, str]:
    """One volume file (and its mask) → uint8 (C, D, H, W), uint8 mask (D, H, W) or None, and the
    info as JSON; ValueError naming the file when it cannot be read (``load_volume``'s)."""
    from haven.learn.volumes import load_volume

    image, mask, info = load_volume(path, mask_path, spacing_mm=volume_spacing(params), size=volume_size(params),
                                    mode=params["mode"], windows=params["windows"])
    stored = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return stored, mask, json.dumps(info)


def write_info(group, infos: list[str]) -> None:
    from zarr.dtype import VariableLengthUTF8

    n = len(infos)
    arr = group.create_array("info", shape=(n,), dtype=VariableLengthUTF8(), chunks=(max(n, 1),))
    if n:
        arr[:] = np.array(infos, dtype=object)


def attrs(params: dict) -> dict:
    """The attrs a volume store adds to a 2-D store's (absent ``dims`` means 2)."""
    return {"dims": 3, "size": volume_size(params), "spacing": volume_spacing(params)}
