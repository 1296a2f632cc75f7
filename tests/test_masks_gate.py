"""Segmentation masks through the safe-haven gate: read, ingested with their images, cleaned by
anonymize, audited; DICOM-SEG objects keep pointing at their (re-identified) source instances."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from deidrun import anonymize_into, audit_of
from haven.ingest import ingest
from haven.sources.masks import clean_mask, is_mask_name, mask_for, read_mask, seg_masks

KEY = b"k" * 32
PLANTED = "Plantedname^Seg"
MASK_NAME = "Maskwriter^Jonas"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _square(h: int = 12, w: int = 16) -> np.ndarray:
    """A 0/1 mask with a non-square footprint (a transposition would show)."""
    m = np.zeros((h, w), np.uint8)
    m[2:5, 3:11] = 1
    return m


def _png(path: Path, a: np.ndarray, text: dict | None = None) -> Path:
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    Image.fromarray(a).save(path, format="PNG", pnginfo=info)
    return path


def _nifti(path: Path, mask: np.ndarray, descrip: str = "") -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(mask.T.copy(), np.eye(4))  # NIfTI's first axis is x: the columns
    if descrip:
        img.header["descrip"] = descrip.encode()
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", descrip.encode()))
    nib.save(img, str(path))
    return path


def test_read_mask_png_binary_and_nifti_agree(tmp_path):
    mask = _square()
    png = read_mask(_png(tmp_path / "a.png", mask * 255))
    assert png.shape == (12, 16) and set(np.unique(png)) == {0, 1}
    assert np.array_equal(png, mask)
    assert np.array_equal(read_mask(_nifti(tmp_path / "a.nii.gz", mask)), png)
    labels = mask * 2  # class indices above 1 are kept as they are
    assert np.array_equal(read_mask(_png(tmp_path / "b.png", labels)), labels)
    with pytest.raises(ValueError, match="bad.png"):
        read_mask((tmp_path / "bad.png").write_bytes(b"\x89PNG broken") and tmp_path / "bad.png")


def test_mask_names_and_lookup(tmp_path):
    assert is_mask_name("a/x_mask.png", "_mask") and is_mask_name("x_mask.nii.gz", "_mask")
    assert not is_mask_name("a/x.png", "_mask") and not is_mask_name("_mask.png", "_mask")
    (tmp_path / "a").mkdir()
    _png(tmp_path / "a" / "x_mask.png", _square())
    assert mask_for("a/x.png", tmp_path) == tmp_path / "a" / "x_mask.png"
    assert mask_for("a/y.png", tmp_path) is None


def test_clean_mask_drops_png_text_and_nifti_header_text(tmp_path):
    data, ext = clean_mask(_png(tmp_path / "m.png", _square() * 255, {"Author": MASK_NAME}))
    assert ext == ".png" and MASK_NAME.encode() not in data
    out = tmp_path / "clean.png"
    out.write_bytes(data)
    assert np.array_equal(read_mask(out), _square()) and not Image.open(out).info
    data, ext = clean_mask(_nifti(tmp_path / "m.nii.gz", _square(), descrip=MASK_NAME))
    out = tmp_path / "clean.nii.gz"
    out.write_bytes(data)
    import gzip

    assert ext == ".nii.gz" and MASK_NAME.encode() not in gzip.decompress(data)
    assert np.array_equal(read_mask(out), _square())
    assert clean_mask(tmp_path / "m.nii.gz")[0] == data  # same mask, same bytes


# ---------------------------------------------------------------------------------------------
# DICOM: two CT slices and a DICOM-SEG over them


def _ct(i: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.1.{i + 1}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.77.1"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.77.9"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Janet", "PID-SEG-1", "19700101", "F"
    ds.StudyDate = ds.SeriesDate = "20200305"
    ds.StudyTime, ds.AccessionNumber, ds.StudyID = "101500", "ACC55443", "S1"
    ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer = "Who^Doctor", "CT", "ACME"
    ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(i)], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
    ds.Rows, ds.Columns = 12, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (np.arange(12 * 16, dtype=np.uint16) + 1000 + i).reshape(12, 16).tobytes()
    return ds


def _seg(sources: list[Dataset], labels: np.ndarray):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=name, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name in ((1, "lesion"), (2, "edema"))]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid="1.2.826.0.1.3680043.8.498.77.2",
        series_number=2, sop_instance_uid="1.2.826.0.1.3680043.8.498.77.2.1", instance_number=1,
        manufacturer="ACME", manufacturer_model_name="Draw", software_versions="1", device_serial_number="42",
        omit_empty_frames=False)
    seg.PatientName = PLANTED  # an identifier only the SEG carries
    return seg


def _labels() -> np.ndarray:
    a = np.zeros((2, 12, 16), np.uint8)
    a[0, 2:5, 3:11] = 1
    a[1, 6:9, 1:4] = 2
    return a


@pytest.fixture(scope="module")
def dicom_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("segproject")
    src = root / "src" / "lesion"
    src.mkdir(parents=True)
    cts = [_ct(i) for i in range(2)]
    for i, ds in enumerate(cts):
        pydicom.dcmwrite(src / f"ct{i}.dcm", ds, enforce_file_format=True)
    _seg(cts, _labels()).save_as(src / "seg.dcm")
    summary = ingest(root / "src", root / "ingest")
    done = anonymize_into(root / "src", root / "ingest", root / "out", KEY)
    return root, cts, summary, done


def test_seg_masks_reads_labels_by_referenced_instance(tmp_path):
    cts = [_ct(i) for i in range(2)]
    _seg(cts, _labels()).save_as(tmp_path / "seg.dcm")
    got = seg_masks(tmp_path / "seg.dcm")
    assert set(got) == {ds.SOPInstanceUID for ds in cts}
    for ds, want in zip(cts, _labels()):
        assert got[ds.SOPInstanceUID].shape == (12, 16) and np.array_equal(got[ds.SOPInstanceUID], want)
    with pytest.raises(ValueError, match="ct.dcm"):
        pydicom.dcmwrite(tmp_path / "ct.dcm", cts[0], enforce_file_format=True)
        seg_masks(tmp_path / "ct.dcm")


def test_seg_is_a_mask_row_and_keeps_its_references_through_anonymize(dicom_project):
    root, cts, summary, done = dicom_project
    assert summary["accepted"] == 3 and summary["quarantined"] == 0
    rows = {r["path"]: r for r in _rows(root / "ingest" / "manifest.csv")}
    assert rows["lesion/seg.dcm"]["role"] == "mask"
    assert rows["lesion/ct0.dcm"]["role"] == rows["lesion/ct1.dcm"]["role"] == "image"
    assert done["anonymized"] == 3 and done["quarantined"] == 0
    out = _rows(root / "out" / "manifest.csv")
    seg_file = next(r["file"] for r in out if r["role"] == "mask")
    new_sops = {str(pydicom.dcmread(root / "out" / "data" / r["file"]).SOPInstanceUID)
                for r in out if r["role"] == "image"}
    assert not new_sops & {ds.SOPInstanceUID for ds in cts}  # they were replaced
    got = seg_masks(root / "out" / "data" / seg_file)
    assert set(got) == new_sops
    by_old = {ds.SOPInstanceUID: want for ds, want in zip(cts, _labels())}
    from haven import keys

    for old, want in by_old.items():
        assert np.array_equal(got[keys.uid(KEY, old)], want)
    seg = pydicom.dcmread(root / "out" / "data" / seg_file)
    assert str(seg.PatientName) != PLANTED


def test_audit_passes_on_seg_and_finds_a_seg_left_raw(dicom_project, tmp_path):
    root, *_ = dicom_project
    result = audit_of(root / "out", root / "ingest", key=KEY)
    assert result["passed"], result["findings"]
    assert result["files"] == 3
    # a segmentation's 1-bit labels are never read as burned-in text, even for a modality asked for
    result = audit_of(root / "out", root / "ingest", key=KEY, ocr_modalities=["SEG", "CT"])
    assert result["passed"] and result["pixel_text_read"] + result["pixel_text_not_read"] == 2  # the CTs only
    raw = tmp_path / "out"
    shutil.copytree(root / "out", raw)
    shutil.copy(root / "src" / "lesion" / "seg.dcm", raw / "data" / "raw_seg.dcm")  # the SEG not anonymized
    result = audit_of(raw, root / "ingest", key=KEY)
    assert not result["passed"]
    assert any(f["file"] == "raw_seg.dcm" and f["where"] == "PatientName" for f in result["findings"])


# ---------------------------------------------------------------------------------------------
# plain images with PNG masks: beside the images, or in a mask folder


def _images(src: Path, masks: Path | None, suffix: str = "_mask") -> None:
    for label in ("lesion", "clear"):
        (src / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            img = (np.random.default_rng(i).random((12, 16)) * 255).astype(np.uint8)
            Image.fromarray(img).save(src / label / f"case{i}.png")
    folder = masks if masks is not None else src
    for i in range(2):  # masks for the lesion images only: the clear ones are all background
        (folder / "lesion").mkdir(parents=True, exist_ok=True)
        name = f"case{i}.png" if masks is not None else f"case{i}{suffix}.png"
        _png(folder / "lesion" / name, _square() * 255, {"Author": MASK_NAME} if i == 0 else None)


@pytest.mark.parametrize("layout", ["beside", "folder", "inside"])
def test_image_masks_are_ingested_cleaned_and_audited(tmp_path, layout):
    src = tmp_path / "src"
    masks = {"beside": None, "folder": tmp_path / "masks", "inside": src / "masks"}[layout]
    _images(src, masks)
    options = {"classes": ["background", "lesion"], "masks": str(masks) if masks else None, "mask_suffix": "_mask"}
    summary = ingest(src, tmp_path / "ingest", segmentation=options)
    assert summary["accepted"] == 4 and summary["quarantined"] == 0  # no mask file became a sample
    rows = {r["path"]: r for r in _rows(tmp_path / "ingest" / "manifest.csv")}
    assert set(rows) == {f"{c}/case{i}.png" for c in ("lesion", "clear") for i in range(2)}
    assert all(r["role"] == "image" for r in rows.values())
    assert not rows["clear/case0.png"]["mask"]
    want = {"beside": "lesion/case0_mask.png", "folder": "../masks/lesion/case0.png",
            "inside": "masks/lesion/case0.png"}[layout]
    assert rows["lesion/case0.png"]["mask"] == want
    with (tmp_path / "ingest" / "identifiers.csv").open("a") as fh:  # the name the audit must not find
        fh.write(f"lesion/case0,mask:author,{MASK_NAME}\n")
    done = anonymize_into(src, tmp_path / "ingest", tmp_path / "out", KEY) if masks is None else \
        _anonymize_with_folder(src, tmp_path, masks)
    assert done["anonymized"] == 4 and done["quarantined"] == 0
    out = _rows(tmp_path / "out" / "manifest.csv")
    with_mask = [r for r in out if r["mask"]]
    assert len(with_mask) == 2 and all(r["mask"] == r["file"][:-4] + ".mask.png" for r in with_mask)
    for r in with_mask:
        data = (tmp_path / "out" / "data" / r["mask"]).read_bytes()
        assert MASK_NAME.encode() not in data and b"tEXt" not in data
        assert np.array_equal(read_mask(tmp_path / "out" / "data" / r["mask"]), _square())
    result = audit_of(tmp_path / "out", tmp_path / "ingest", key=KEY)
    assert result["passed"], result["findings"]
    assert result["files"] == 6


def _anonymize_with_folder(src: Path, tmp_path: Path, masks: Path) -> dict:
    from haven.deid.anonymize import anonymize

    out = tmp_path / "out"
    return anonymize(src, tmp_path / "ingest" / "manifest.csv", KEY, data=out / "data", manifest=out / "manifest.csv",
                     log_csv=out / "anonymization.log.csv", quarantine=out / "quarantine.csv", masks=masks)


def test_a_mask_left_with_text_fails_the_audit_and_a_bad_mask_quarantines(tmp_path):
    src = tmp_path / "src"
    _images(src, None)
    options = {"masks": None, "mask_suffix": "_mask"}
    ingest(src, tmp_path / "ingest", segmentation=options)
    anonymize_into(src, tmp_path / "ingest", tmp_path / "out", KEY)
    out = _rows(tmp_path / "out" / "manifest.csv")
    target = tmp_path / "out" / "data" / next(r["mask"] for r in out if r["mask"])
    _png(target, _square() * 255, {"Author": MASK_NAME})  # as if the mask had been copied as it was
    result = audit_of(tmp_path / "out", tmp_path / "ingest", key=KEY)
    assert not result["passed"]
    assert any(f["where"] == "PNG tEXt chunk" and f["kind"] == "metadata" for f in result["findings"])
    # a mask that breaks after ingest: its image is quarantined, with the problem and no file name
    (src / "lesion" / "case1_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    done = anonymize_into(src, tmp_path / "ingest", tmp_path / "out2", KEY)
    assert done["quarantined"] == 1
    reason = _rows(tmp_path / "out2" / "quarantine.csv")[0]["reason"]
    assert "mask" in reason and "case1" not in reason
    # and at ingest: the wrong size is named
    _png(src / "lesion" / "case1_mask.png", np.zeros((5, 5), np.uint8))
    ingest(src, tmp_path / "ingest2", segmentation=options)
    q = _rows(tmp_path / "ingest2" / "quarantine.csv")
    assert [r["path"] for r in q] == ["lesion/case1.png"] and "5x5" in q[0]["reason"]


def test_nifti_mask_is_cleaned_and_audited(tmp_path):
    src = tmp_path / "src"
    (src / "lesion").mkdir(parents=True)
    Image.fromarray(np.full((12, 16), 90, np.uint8)).save(src / "lesion" / "a.png")
    _nifti(src / "lesion" / "a_mask.nii.gz", _square(), descrip=MASK_NAME)
    ingest(src, tmp_path / "ingest", segmentation={"masks": None, "mask_suffix": "_mask"})
    assert _rows(tmp_path / "ingest" / "manifest.csv")[0]["mask"] == "lesion/a_mask.nii.gz"
    anonymize_into(src, tmp_path / "ingest", tmp_path / "out", KEY)
    row = _rows(tmp_path / "out" / "manifest.csv")[0]
    assert row["mask"].endswith(".mask.nii.gz")
    assert np.array_equal(read_mask(tmp_path / "out" / "data" / row["mask"]), _square())
    assert audit_of(tmp_path / "out", tmp_path / "ingest", key=KEY)["passed"]
    # the audit reads NIfTI header text: the original mask would fail it
    shutil.copy(src / "lesion" / "a_mask.nii.gz", tmp_path / "out" / "data" / "raw.nii.gz")
    found = audit_of(tmp_path / "out", tmp_path / "ingest", key=KEY)["findings"]
    assert {f["where"] for f in found if f["file"] == "raw.nii.gz"} >= {"NIfTI descrip", "NIfTI extension 0"}


def test_sharded_anonymize_merges_the_mask_paths(tmp_path):
    from deidrun import merge_into

    src = tmp_path / "src"
    _images(src, None)
    ingest(src, tmp_path / "ingest", segmentation={"masks": None, "mask_suffix": "_mask"})
    data = tmp_path / "data"
    shards = []
    for i in range(2):
        shards.append(tmp_path / "shards" / f"s{i}")
        anonymize_into(src, tmp_path / "ingest", shards[-1], KEY, shard=(i, 2), data=data / f"s{i}")
    merge_into(shards, tmp_path / "merged")
    rows = _rows(tmp_path / "merged" / "manifest.csv")
    masked = [r for r in rows if r["mask"]]
    assert len(rows) == 4 and len(masked) == 2
    for r in masked:  # each mask path is relative to the data root, as the image's is
        assert r["mask"].split("/")[0] == r["file"].split("/")[0]
        assert np.array_equal(read_mask(data / r["mask"]), _square())
