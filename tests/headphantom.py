"""A synthetic head for the defacing tests: brain in a closed skull, scalp, a face (block of soft
tissue, nose, eyes) in front of and below the brain, and a neck; as CT (HU) or T1-like MR slices.

No real 3D head series ships in any package this project can install (deid-data's CT brain is two
slices, nilearn's MNI template is skull-stripped), so the geometry is drawn here, in patient (LPS)
millimetres, with its parts known voxel by voxel.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

BRAIN_C, BRAIN_R = np.array([0.0, 10.0, 30.0]), np.array([62.0, 78.0, 58.0])


def _ellipsoid(p, c, r):
    return (((p - c) / r) ** 2).sum(axis=-1) <= 1.0


def parts(pixel_mm: float = 2.0, slice_mm: float = 3.0, size: int = 128, z=(-110.0, 100.0)):
    """Boolean maps (rows, cols, slices) of each part and the grid's positions."""
    zs = np.arange(z[0], z[1] + 1e-6, slice_mm)
    xy = (np.arange(size) - size / 2 + 0.5) * pixel_mm
    # rows run posterior (+y), columns run left (+x): ImageOrientationPatient 1\0\0\0\1\0
    X, Y, Z = np.meshgrid(xy, xy, zs, indexing="xy")
    p = np.stack([X, Y, Z], axis=-1)
    brain = _ellipsoid(p, BRAIN_C, BRAIN_R)
    skull = _ellipsoid(p, BRAIN_C, BRAIN_R + 7) & ~brain
    scalp = _ellipsoid(p, BRAIN_C, BRAIN_R + 12) & ~brain & ~skull
    face = _ellipsoid(p, np.array([0.0, -62.0, -40.0]), np.array([48.0, 34.0, 48.0]))
    nose = _ellipsoid(p, np.array([0.0, -98.0, -22.0]), np.array([9.0, 16.0, 20.0]))
    eyes = (_ellipsoid(p, np.array([30.0, -72.0, 2.0]), np.array([11.0, 11.0, 11.0]))
            | _ellipsoid(p, np.array([-30.0, -72.0, 2.0]), np.array([11.0, 11.0, 11.0])))
    neck = ((X ** 2 + (Y - 25) ** 2) <= 45.0 ** 2) & (Z < -10)
    head = brain | skull | scalp
    face = (face | nose | eyes) & ~head
    neck = neck & ~head & ~face
    return {"brain": brain, "skull": skull, "scalp": scalp, "face": face,
            "nose": nose & ~head, "eyes": eyes & ~head, "neck": neck}, xy, zs


def series(modality: str = "CT", body_part: str = "HEAD", seed: int = 0, **grid) -> tuple[list[Dataset], dict]:
    """The phantom as one DICOM series of single-frame slices, and its part maps."""
    rng = np.random.default_rng(seed)
    m, xy, zs = parts(**grid)
    if modality == "CT":
        vol = np.full(m["brain"].shape, -1000.0)
        for name, value in (("neck", 40), ("face", 40), ("scalp", 40), ("skull", 1200), ("brain", 35),
                            ("eyes", 10)):
            vol[m[name]] = value
        vol += rng.normal(0, 4, vol.shape)
        stored = np.round(vol + 1024).clip(0, 4095).astype(np.uint16)
    else:
        vol = np.zeros(m["brain"].shape)
        for name, value in (("neck", 500), ("face", 520), ("scalp", 900), ("skull", 60), ("brain", 600),
                            ("eyes", 120)):
            vol[m[name]] = value
        vol += np.abs(rng.normal(0, 12, vol.shape))
        stored = np.round(vol).clip(0, 4095).astype(np.uint16)
    study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
    pixel_mm = float(grid.get("pixel_mm", 2.0))
    out = []
    for k, z in enumerate(zs):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID = "Phantom^Head", "PHANTOM-0001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.Modality = modality
        if body_part:
            ds.BodyPartExamined = body_part
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(xy[0]), float(xy[0]), float(z)]
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SliceThickness = float(grid.get("slice_mm", 3.0))
        ds.Rows, ds.Columns = stored.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.ascontiguousarray(stored[:, :, k]).tobytes()
        out.append(ds)
    return out, m


def enhanced(datasets: list[Dataset], order=None) -> Dataset:
    """The slices as one enhanced multi-frame file (frames in ``order``; positions in the
    per-frame functional groups, orientation and spacing shared)."""
    from pydicom.sequence import Sequence

    order = list(range(len(datasets))) if order is None else list(order)
    first = datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1" if first.Modality == "MR" else "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
               "Modality", "BodyPartExamined", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
               "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        if kw in first:
            setattr(ds, kw, first.get(kw))
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    if "RescaleIntercept" in first:
        transform = Dataset()
        transform.RescaleIntercept, transform.RescaleSlope = first.RescaleIntercept, first.RescaleSlope
        transform.RescaleType = "HU"
        shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in order:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = datasets[i].ImagePositionPatient
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(datasets[i].PixelData for i in order)
    return ds


def frames_stack(ds: Dataset) -> np.ndarray:
    """An enhanced file's stored values as (rows, cols, slices), slices in position order."""
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    arr = ds.pixel_array
    return np.stack([arr[i] for i in np.argsort(z)], axis=-1)


def write(datasets: list[Dataset], folder) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        p = folder / f"slice{k:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def stack(datasets: list[Dataset]) -> np.ndarray:
    """Stored values back as (rows, cols, slices), slices in position order."""
    order = np.argsort([float(ds.ImagePositionPatient[2]) for ds in datasets])
    return np.stack([datasets[i].pixel_array for i in order], axis=-1)


__all__ = ["parts", "series", "enhanced", "frames_stack", "write", "stack", "pydicom"]
