"""Defacing: the PS3.15 Clean Recognizable Visual Features option for 3D head CT and MR series.

A head volume can be rendered into a face that people (and face recognition) recognise.  When a
project enables ``anonymize.deface``, every series of the listed modalities that covers a head
(BodyPartExamined, or no body part given) and holds enough slices to be a volume is defaced after
its files are de-identified:

1. the slices are stacked by their position along the slice normal into a volume with its patient
   geometry (:func:`volume`);
2. it is resampled onto an isotropic grid aligned with the patient axes, where a brain mask is
   found: for CT from Hounsfield units (soft tissue inside the closed ring of the skull, per axial
   slice; :func:`brain_mask_ct`), for MR by FSL BET's surface model as implemented by the
   ``brainextractor`` package (:func:`brain_mask_mr`);
3. Quickshear (the ``quickshear`` package, Schimke & Hale 2011) puts a plane along the lower front
   edge of the brain mask's sagittal hull, ``buffer_mm`` below it, and every voxel in front of and
   below the plane is set to the background (air) value in the original slices.

A volume whose brain mask is implausible (too small or too large for a head) cannot be defaced
confidently: the anonymize stage quarantines the whole series instead of passing a face through.
Defaced files carry RecognizableVisualFeatures = NO and the option's code (113102) in their
DeidentificationMethodCodeSequence, which the audit checks.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np

CODE = ("113102", "Clean Recognizable Visual Features Option")


class DefaceError(Exception):
    """A head volume that cannot be defaced confidently; the message names the cause and the fix
    and carries no identifier."""


def options(given: dict | None) -> dict:
    """``anonymize.deface`` checked, what it leaves out from the schema's defaults."""
    from haven.config import section_defaults, with_defaults

    opts = with_defaults(given, section_defaults("anonymize", "deface"), "anonymize.deface")
    opts["modalities"] = [str(m).upper() for m in opts["modalities"]]
    opts["body_parts"] = [str(b).upper() for b in opts["body_parts"]]
    if opts["missing_body_part"] not in ("deface", "skip"):
        raise ValueError("anonymize.deface.missing_body_part must be 'deface' or 'skip'")
    lo, hi = (float(v) for v in opts["brain_ml"])
    if not 0 < lo < hi:
        raise ValueError("anonymize.deface.brain_ml must be [low, high] with 0 < low < high")
    return opts


def applies(ds, opts: dict) -> bool:
    """Whether a (de-identified) file belongs to a series this project defaces."""
    if not opts.get("enabled"):
        return False
    if str(ds.get("Modality", "") or "").strip().upper() not in opts["modalities"]:
        return False
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if not part:
        return opts["missing_body_part"] == "deface"
    return part in opts["body_parts"]


def candidates(manifest, opts: dict) -> dict[str, list[str]]:
    """The files of each series in an anonymize manifest that may be a head volume to deface (DICOM
    of the defaced modalities); whether it is one is decided from the files (:func:`applies`, :func:`slices`)."""
    series: dict[str, list[str]] = {}
    for row in manifest:
        if row.get("kind") == "dicom" and row.get("series") and \
                (row.get("modality") or "").upper() in opts["modalities"]:
            series.setdefault(row["series"], []).append(row["file"])
    return series


def slices(datasets) -> int:
    """Slices in a series: its single-frame files plus the frames of its multi-frame ones."""
    return sum(max(1, int(ds.get("NumberOfFrames", 1) or 1)) for ds in datasets)


# ---------------------------------------------------------------------------------------------
# the volume


@dataclass
class Volume:
    data: np.ndarray  # (columns, rows, slices), stored values
    affine: np.ndarray  # voxel index (i, j, k) -> RAS millimetres
    order: list[tuple[int, int]]  # (dataset, frame) of each slice
    pixels: list[np.ndarray]  # each dataset's stored values, as (frames, rows, columns)


_NO_GEOMETRY = ("head volume without slice geometry (ImageOrientationPatient, ImagePositionPatient, "
                "PixelSpacing, or their functional groups in a multi-frame file): it cannot be defaced")


def _functional(ds, frame: int, sequence: str, attribute: str):
    """An attribute of a multi-frame file's functional groups: per frame, else shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index:
            macro = items[index].get(sequence)
            if macro and attribute in macro[0]:
                return macro[0].get(attribute)
    return None


def _frames(ds) -> list[tuple[np.ndarray, np.ndarray, list[float]]]:
    """(orientation, position, pixel spacing) of each frame of a file."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    out = []
    for f in range(frames):
        if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
            iop = _functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
            ipp = _functional(ds, f, "PlanePositionSequence", "ImagePositionPatient")
            spacing = _functional(ds, f, "PixelMeasuresSequence", "PixelSpacing")
        elif frames == 1:
            iop, ipp, spacing = (ds.get(k) for k in ("ImageOrientationPatient", "ImagePositionPatient",
                                                     "PixelSpacing"))
        else:
            raise DefaceError("multi-frame head volume without per-frame positions (no functional "
                              "groups): it cannot be stacked; export the series as single-frame slices")
        if iop is None or ipp is None or spacing is None:
            raise DefaceError(_NO_GEOMETRY)
        try:
            g = (np.array([float(v) for v in iop]), np.array([float(v) for v in ipp]), [float(v) for v in spacing])
        except Exception:
            raise DefaceError(_NO_GEOMETRY) from None
        if g[0].shape != (6,) or g[1].shape != (3,) or len(g[2]) != 2 or min(g[2]) <= 0:
            raise DefaceError("head volume with malformed slice geometry: it cannot be defaced")
        out.append(g)
    return out


def rescale(ds) -> tuple[float, float]:
    """(slope, intercept) from stored values to the modality's units (HU for CT)."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None:
        slope = _functional(ds, 0, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, 0, "PixelValueTransformationSequence", "RescaleIntercept")
    return float(slope if slope not in (None, "") else 1), float(intercept if intercept not in (None, "") else 0)


def volume(datasets: list) -> Volume:
    """Stack the slices of one series (single-frame files, or the frames of multi-frame ones) into a
    volume in patient geometry (raises :class:`DefaceError`)."""
    geometry = []  # (dataset, frame, orientation, position, spacing, shape)
    for d, ds in enumerate(datasets):
        try:
            shape = (int(ds.Rows), int(ds.Columns))
        except Exception:
            raise DefaceError(_NO_GEOMETRY) from None
        for f, (iop, ipp, spacing) in enumerate(_frames(ds)):
            geometry.append((d, f, iop, ipp, spacing, shape))
    iop0, spacing0, shape0 = geometry[0][2], geometry[0][4], geometry[0][5]
    for _, _, iop, _, spacing, shape in geometry[1:]:
        if shape != shape0 or not np.allclose(iop, iop0, atol=1e-3) or not np.allclose(spacing, spacing0, rtol=1e-3):
            raise DefaceError("series mixes slice orientations or sizes (a localizer among the slices?): "
                              "it cannot be stacked into one volume for defacing; move the odd slices "
                              "to a series of their own")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    where = np.array([g[3] @ normal for g in geometry])
    order = [int(i) for i in np.argsort(where, kind="stable")]
    steps = np.diff(where[order])
    if len(steps) == 0 or np.any(steps < 1e-3):
        raise DefaceError("series holds several slices at one position (several volumes or echoes "
                          "in one series): it cannot be stacked into one volume for defacing")
    step = float(np.median(steps))
    pixels = []
    for ds in datasets:
        arr = np.asarray(ds.pixel_array)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if arr.ndim != (2 if frames == 1 else 3) or arr.shape[-2:] != shape0:
            raise DefaceError("head volume with colour slices: it cannot be defaced")
        pixels.append(np.array(arr.reshape((frames,) + shape0), copy=True))
    data = np.stack([pixels[geometry[i][0]][geometry[i][1]] for i in order], axis=-1).transpose(1, 0, 2)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing0[1]
    lps[:3, 1] = col_dir * spacing0[0]
    # the step between slices, from the first to the last position: along the normal, or sheared
    # for a gantry-tilted CT
    span = geometry[order[-1]][3] - geometry[order[0]][3]
    lps[:3, 2] = span / (len(order) - 1) if abs(span @ normal) > 0 else normal * step
    lps[:3, 3] = geometry[order[0]][3]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return Volume(data, ras, [(geometry[i][0], geometry[i][1]) for i in order], pixels)


# ---------------------------------------------------------------------------------------------
# brain masks (on an isotropic grid aligned with R, A, S)


def _grid(vol: Volume, mm: float):
    """An isotropic RAS grid holding the volume: (shape, affine)."""
    shape = np.array(vol.data.shape)
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]) @ vol.affine.T
    lo, hi = corners[:, :3].min(axis=0), corners[:, :3].max(axis=0)
    dims = tuple(int(np.ceil((h - l) / mm)) + 1 for l, h in zip(lo, hi))
    affine = np.diag([mm, mm, mm, 1.0])
    affine[:3, 3] = lo
    return dims, affine


def brain_mask_ct(hu: np.ndarray, mm: float) -> np.ndarray:
    """Brain of a head CT on a RAS grid: soft tissue (−20…100 HU) inside the skull's closed ring
    (> 300 HU) in each axial slice, opened to cut thin bridges, the largest connected part."""
    from scipy import ndimage

    bone = hu > 300
    inside = np.zeros_like(bone)
    for k in range(bone.shape[2]):
        if bone[:, :, k].any():
            inside[:, :, k] = ndimage.binary_fill_holes(bone[:, :, k]) & ~bone[:, :, k]
    soft = inside & (hu > -20) & (hu < 100)
    soft = ndimage.binary_opening(soft, iterations=max(1, int(round(3.0 / mm))))
    labels, n = ndimage.label(soft)
    if n == 0:
        return soft
    sizes = ndimage.sum(soft, labels, index=range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def brain_mask_mr(image, mm: float) -> np.ndarray:
    """Brain of a head MR on a RAS grid: FSL BET's deformable surface (``brainextractor``)."""
    try:
        from brainextractor import BrainExtractor
    except ImportError:
        raise DefaceError("MR defacing needs the brainextractor package (pip install brainextractor)") from None
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bet = BrainExtractor(image)
        bet.run(iterations=1000)
        return bet.compute_mask() > 0


# ---------------------------------------------------------------------------------------------
# the shear


def face_mask(vol: Volume, modality: str, slope: float, intercept: float, opts: dict) -> np.ndarray:
    """Voxels of ``vol`` (its own grid) in front of and below the Quickshear plane: True = remove."""
    import nibabel as nb
    from nibabel.processing import resample_from_to
    from quickshear import quickshear

    mm = float(opts["grid_mm"])
    native = nb.Nifti1Image(vol.data.astype(np.float32) * slope + intercept, vol.affine)
    dims, affine = _grid(vol, mm)
    background = float(native.dataobj.min())
    iso = resample_from_to(native, (dims, affine), order=1, cval=background)
    values = np.asanyarray(iso.dataobj)
    if modality == "CT":
        brain = brain_mask_ct(values, mm)
    else:
        brain = brain_mask_mr(nb.Nifti1Image(values - background, affine), mm)
    ml = float(brain.sum()) * mm ** 3 / 1000.0
    lo, hi = (float(v) for v in opts["brain_ml"])
    if not lo <= ml <= hi:
        raise DefaceError(f"no brain of plausible size found in the head volume ({ml:.0f} mL, expected "
                          f"{lo:.0f}-{hi:.0f}): it cannot be defaced confidently; check anonymize.deface "
                          f"(modalities, body_parts, brain_ml) or deface the series by hand")
    # Quickshear walks the plane over as many anterior-posterior columns as the grid has axial
    # slices: pad (in front of the face or above the head) to a grid as deep as it is tall
    side = max(dims[1], dims[2])
    padded = np.zeros((dims[0], side, side), dtype=np.uint8)
    padded[:, :dims[1], :dims[2]] = brain
    ones = nb.Nifti1Image(np.ones(padded.shape, dtype=np.uint8), affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its 2-D np.cross (NumPy 2)
        sheared = quickshear(ones, nb.Nifti1Image(padded, affine), buff=float(opts["buffer_mm"]) / mm)
    keep = np.asanyarray(sheared.dataobj)[:, :dims[1], :dims[2]]
    keep_native = resample_from_to(nb.Nifti1Image(keep.astype(np.uint8), affine), native, order=0, cval=1)
    return np.asanyarray(keep_native.dataobj) == 0


def deface(datasets: list, opts: dict) -> int:
    """Deface one series (its datasets, in place): the voxels in the removed region.  Raises :class:`DefaceError`."""
    vol = volume(datasets)
    ds0 = datasets[0]
    modality = str(ds0.get("Modality", "") or "").strip().upper()
    slope, intercept = rescale(ds0)
    remove = face_mask(vol, modality, slope, intercept, opts)
    photometric = str(ds0.get("PhotometricInterpretation", "") or "").strip().upper() or "MONOCHROME2"
    background = vol.data.max() if photometric == "MONOCHROME1" else vol.data.min()
    touched = set()
    for k, (d, f) in enumerate(vol.order):
        cut = remove[:, :, k].T  # back to (rows, cols)
        frame = vol.pixels[d][f]
        if cut.any() and np.any(frame[cut] != background):
            frame[cut] = background
            touched.add(d)
    for d in sorted(touched):
        ds, arr = datasets[d], vol.pixels[d]
        arr = arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[0]
        bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or arr.dtype.itemsize * 8)
        try:
            ds.set_pixel_data(np.ascontiguousarray(arr), photometric, min(bits, arr.dtype.itemsize * 8),
                              generate_instance_uid=False)
        except NotImplementedError:
            raise DefaceError("big-endian pixel data cannot be re-encoded after defacing: convert "
                              "the series to little endian first (e.g. dcmtk's `dcmconv +te`)") from None
    for ds in datasets:
        ds.RecognizableVisualFeatures = "NO"
    return int(remove.sum())


def deface_array(data: np.ndarray, affine: np.ndarray, modality: str, opts: dict) -> tuple[np.ndarray, int]:
    """Deface one volume given as an array (a NIfTI's voxels, ``affine`` its voxel -> RAS mm; values
    in the modality's units, HU for CT): (a defaced copy, the voxels in the removed region), the
    region set to the volume's minimum (air).  Raises :class:`DefaceError`."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise DefaceError(f"a head volume must be 3-D to deface (this one has {data.ndim} dimensions)")
    remove = face_mask(Volume(data, np.asarray(affine, float), [], []), modality.upper(), 1.0, 0.0, opts)
    out = np.array(data, copy=True)
    out[remove] = data.min()
    return out, int(remove.sum())

