"""Predicted masks written out: PNG (uint8 class labels), NIfTI and DICOM-SEG.

* **PNG**: the label map as 8-bit grey (0 = background, k = the k-th class), lossless.
* **NIfTI** (nibabel): the mask as a (columns, rows, 1) volume, i.e. array index (i, j) = pixel
  (column, row), x first as ITK and Slicer write a 2D image, so ``nib.load(path).get_fdata()[..., 0].T``
  (or :func:`haven.sources.masks.read_mask`) is the mask as predicted.  The affine is
  NIfTI's RAS+ world: the identity for PNG/JPEG sources (no geometry), and for a DICOM source the
  image plane from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (:func:`dicom_affine`),
  with DICOM's LPS x and y negated the way dcm2niix and nibabel do.  Pixel (0, 0) thus lands on
  (-x, -y, z) of ImagePositionPatient.
* **DICOM-SEG** (highdicom): a BINARY Segmentation with one segment per foreground class, each
  described as AUTOMATIC with the model's name and version as its algorithm and the class as a
  local ``99HAVEN`` code (the same codes as the prediction SR, :func:`haven.predict.sr.finding_code`),
  referencing the source instance.  The mask must already be at the source's Rows x Columns (a model
  predicts at its own size; resize back with nearest interpolation first).  Its UIDs are derived
  from the source instance and the model, so a re-run writes the same objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from haven.predict.sr import finding_code

__all__ = ["dicom_affine", "dicom_seg", "write_dicom_seg", "write_nifti", "write_png"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _labels(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"a predicted mask must be (H, W) class labels, got shape {m.shape}")
    if m.size and (m.min() < 0 or m.max() > 255 or not np.all(np.equal(np.mod(m, 1), 0))):
        raise ValueError("a predicted mask must hold integer class labels 0..255")
    return m.astype(np.uint8)


def write_png(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """The label map as an 8-bit grey PNG (values = class indices)."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(_labels(mask), mode="L").save(path, format="PNG")
    return path


def dicom_affine(ds) -> np.ndarray:
    """The 4x4 RAS+ affine of a DICOM image plane for an array indexed (row, column, slice).

    Column 0 steps one row (PixelSpacing[0] along the column direction cosines, the second half of
    ImageOrientationPatient), column 1 one column (PixelSpacing[1] along the row cosines), column 2
    the slice normal (their cross product) times SliceThickness (1 when absent)."""
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
    if missing:
        raise ValueError(f"the DICOM source has no {', '.join(missing)}: its geometry is unknown; "
                         "write the mask as PNG or with an identity affine instead")
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    thickness = float(ds.get("SliceThickness") or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = col_cos * row_spacing  # next row: down the column direction
    lps[:3, 1] = row_cos * col_spacing  # next column: along the row direction
    lps[:3, 2] = normal * thickness
    lps[:3, 3] = ipp
    return _LPS_TO_RAS @ lps


def write_nifti(mask: np.ndarray, path: str | os.PathLike, affine: np.ndarray | None = None) -> Path:
    """The mask as a (H, W, 1) uint8 NIfTI (``.nii`` or ``.nii.gz``); ``affine`` defaults to the
    identity (use :func:`dicom_affine` for a DICOM source)."""
    import nibabel as nib

    path = Path(path)
    # NIfTI's first axis is x, the columns (as ITK, ITK-SNAP and Slicer write a 2D image and as
    # haven.sources.masks.read_mask reads one back): the (row, column) map is stored transposed, and
    # the affine's first two columns (which step a row, a column) swapped with it
    data = _labels(mask).T[:, :, None]
    affine = None if affine is None else np.asarray(affine, dtype=np.float64)[:, [1, 0, 2, 3]]
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    img.header.set_intent("label")
    img.set_qform(img.affine, code=1 if affine is not None else 0)
    img.set_sform(img.affine, code=1 if affine is not None else 2)
    nib.save(img, str(path))
    return path


def _uid(*parts: str) -> str:
    """A 2.25 UID these parts decide (the same source and model give the same SEG UIDs)."""
    from haven.predict.sr import derived_uid

    return derived_uid("haven-seg", *parts)


def _descriptions(classes: list[str], model: str, version: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=model[:64], family=codes.cid7162.ArtificialIntelligence,
                                                   version=version[:64])
    return [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=finding_code(name),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    ) for i, name in enumerate(classes[1:], start=1)]


def dicom_seg(mask: np.ndarray, source, classes: list[str], model: str, version: str | None = None,
              manufacturer: str = "haven"):
    """The DICOM-SEG (a ``highdicom.seg.Segmentation``) of one predicted mask on its source instance.

    ``mask`` (Rows, Columns) labels 0..K-1 at the source's size, ``source`` the original pydicom
    dataset (with pixel geometry), ``classes`` the model's classes, background first."""
    import highdicom as hd

    labels = _labels(mask)
    rows, cols = int(source.Rows), int(source.Columns)
    if labels.shape != (rows, cols):
        raise ValueError(f"the mask is {labels.shape[0]}x{labels.shape[1]} but the source instance is "
                         f"{rows}x{cols} (Rows x Columns): resize the prediction back to the source "
                         "(nearest interpolation) before writing a DICOM-SEG")
    if len(classes) < 2:
        raise ValueError(f"a DICOM-SEG needs a background and >= 1 foreground class, got {classes}")
    if labels.max(initial=0) >= len(classes):
        raise ValueError(f"mask label {labels.max()} has no class (classes: {', '.join(classes)})")
    version = version or "unversioned"
    src_uid = str(source.SOPInstanceUID)
    return hd.seg.Segmentation(
        source_images=[source], pixel_array=labels[None],  # (1 frame, R, C) label map: segment numbers
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(classes, model, version),
        series_instance_uid=_uid("series", src_uid, model, version), series_number=9002,
        sop_instance_uid=_uid("sop", src_uid, model, version), instance_number=1,
        manufacturer=manufacturer, manufacturer_model_name=model[:64], software_versions=version[:64],
        device_serial_number=_uid("device", model, version)[-16:],
        omit_empty_frames=False,  # an empty prediction is a result too: keep its (empty) frames
        series_description=f"haven {model} {version}"[:64],
    )


def write_dicom_seg(mask: np.ndarray, source, path: str | os.PathLike, classes: list[str], model: str,
                    version: str | None = None) -> Path:
    """Build :func:`dicom_seg` and save it to ``path``."""
    path = Path(path)
    dicom_seg(mask, source, classes, model, version).save_as(path)
    return path
