"""Burned-in text in pixels: the audit reads it (OCR) on the originals, anonymize blacks it out.

The real corpus is deid-data's three ultrasounds (a greyscale image, an RGB image and a 30-frame
RGB cine from Philips and Siemens scanners, each with the patient's name, id, birth date and the
institution burned into the pixels).  OCR needs Debian's ``tesseract-ocr`` (installed by
``.ci/system-setup``); the OCR tests skip without it, except in CI (HAVEN_SYSTEM_REQUIRED=1).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from haven.deid import redact
from deidrun import anonymize_into, audit_of
from haven.deid.audit import audit_tree
from haven.deid.identifiers import collect_identifiers
from haven.ingest import ingest

KEY = b"redact-test-key-0123456789abcdef"
NAME, PID, BIRTH = "QUIRKE^ARCHIBALD", "MRN77881234", "19480317"


def need_ocr():
    if redact.ocr_available():
        return
    if os.environ.get("HAVEN_SYSTEM_REQUIRED") == "1":
        pytest.fail("tesseract-ocr / pytesseract missing: run .ci/system-setup")
    pytest.skip("tesseract-ocr not installed (.ci/system-setup installs it)")


def ultrasounds() -> Path:
    import deid_data

    return Path(deid_data.__file__).parent / "data" / "ultrasounds"


def _sc_with_text(path: Path, text: str = "QUIRKE ARCHIBALD  MRN77881234  03/17/1948") -> Path:
    """A secondary capture: a smooth gradient 'image' with a name, id and birth date burned in."""
    rows, cols = 240, 640
    yy, xx = np.mgrid[0:rows, 0:cols]
    img = ((xx + yy) % 97).astype(np.uint8) + 60
    img[:40] = 0
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((8, 6), text, fill=255, font=ImageFont.load_default(size=24))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.7777.55.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7777.55"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7777.55.0"
    ds.Modality = "OT"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Grabber 2"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
    ds.set_pixel_data(np.asarray(pil), "MONOCHROME2", 8, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _pipeline(src: Path, work: Path, pixels: dict | None = None) -> dict:
    ingest(src, work / "ingest")
    summary = anonymize_into(src, work / "ingest", work / "anon", KEY, {"pixels": pixels or {}})
    with open(work / "anon" / "anonymization.log.csv", newline="") as fh:
        summary["log"] = list(csv.DictReader(fh))
    with open(work / "anon" / "quarantine.csv", newline="") as fh:
        summary["quarantine"] = list(csv.DictReader(fh))
    return summary


def _outputs(work: Path) -> list[Path]:
    return sorted((work / "anon" / "data").rglob("*.dcm"))


# ---------------------------------------------------------------------------------------------
# real ultrasounds


def test_real_ultrasound_text_is_found_then_removed(tmp_path):
    need_ocr()
    src = tmp_path / "src" / "us"
    src.mkdir(parents=True)
    for f in ultrasounds().glob("*.dcm"):
        shutil.copy(f, src / f.name)
    # the audit must be able to fail: on the originals it reads the burned-in PHI
    ids = [v for f in src.glob("*.dcm") for _, v in collect_identifiers(pydicom.dcmread(f))]
    before = audit_tree(src, ids)
    pixel_hits = {f["file"] for f in before["findings"] if f["where"] == "(7FE0,0010) burned-in text"}
    assert len(pixel_hits) == 2, before["findings"]  # the cine's text is technical (Hz, bpm), no PHI
    assert before["pixel_text_read"] == 3

    s = _pipeline(tmp_path / "src", tmp_path)
    assert (s["anonymized"], s["quarantined"]) == (3, 0), s["quarantine"]
    result = audit_of(tmp_path / "anon", tmp_path / "ingest")
    assert result["passed"], result["findings"]
    assert result["pixel_text_read"] == 3 and result["pixel_text_not_read"] == 0
    for out in _outputs(tmp_path):
        ds = pydicom.dcmread(out)
        assert ds.BurnedInAnnotation == "NO"
        assert "113101" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        arr = ds.pixel_array
        frame = arr[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr
        # the header bar (outside the ultrasound regions) is black; the scan area is not
        top = int(ds.SequenceOfUltrasoundRegions[0].RegionLocationMinY0)
        assert frame[:top].max() == 0
        assert frame[top:].max() > 0
        words = [w for w, c, _ in redact.read_words(redact.ocr_gray(frame, ds.PhotometricInterpretation))
                 if c >= 60 and sum(ch.isalnum() for ch in w) >= 3]
        assert not words


# ---------------------------------------------------------------------------------------------
# a secondary capture with a name, an id and a birth date drawn into it


def test_secondary_capture_text_blacked_out_rest_untouched(tmp_path):
    need_ocr()
    path = _sc_with_text(tmp_path / "src" / "sc" / "capture.dcm")
    original = pydicom.dcmread(path).pixel_array
    before = audit_tree(path.parent, [NAME, PID, BIRTH])
    kinds = {f["kind"] for f in before["findings"] if f["where"] == "(7FE0,0010) burned-in text"}
    assert kinds == {"identifier"} and len(before["findings"]) >= 1

    s = _pipeline(tmp_path / "src", tmp_path)
    assert s["anonymized"] == 1, s["quarantine"]
    assert audit_of(tmp_path / "anon", tmp_path / "ingest")["passed"]
    cleaned = pydicom.dcmread(_outputs(tmp_path)[0]).pixel_array
    assert cleaned[:40].max() < 255 // 2  # the text band: no bright glyph pixels left
    assert np.array_equal(cleaned[60:], original[60:])  # the image below it: bit-identical


def test_rectangles_without_ocr(tmp_path):
    """A device's configured rectangle is blacked out exactly; no OCR is needed for it."""
    path = _sc_with_text(tmp_path / "src" / "sc" / "capture.dcm")
    original = pydicom.dcmread(path).pixel_array
    pixels = {"ocr": False, "rectangles": [
        {"match": {"Manufacturer": "ACME", "ManufacturerModelName": "Grabber 2"}, "boxes": [[0, 0, 640, 40]]},
        {"match": {"Manufacturer": "OTHER"}, "boxes": [[0, 100, 640, 240]]},  # another device: not applied
    ]}
    s = _pipeline(tmp_path / "src", tmp_path, pixels)
    assert s["anonymized"] == 1, s["quarantine"]
    cleaned = pydicom.dcmread(_outputs(tmp_path)[0]).pixel_array
    assert cleaned[:40].max() == 0
    assert np.array_equal(cleaned[40:], original[40:])


def test_unconfident_cleaning_is_quarantined(tmp_path, monkeypatch):
    """No OCR engine and no rectangle for the device: the file is quarantined, with the fix."""
    _sc_with_text(tmp_path / "src" / "sc" / "capture.dcm")
    monkeypatch.setattr(redact, "ocr_available", lambda: False)
    s = _pipeline(tmp_path / "src", tmp_path)
    assert (s["anonymized"], s["quarantined"]) == (0, 1)
    reason = s["quarantine"][0]["reason"]
    assert "tesseract-ocr" in reason and "rectangles" in reason
    assert not _outputs(tmp_path)
    # ocr switched off and nothing else applies: quarantined too
    s = _pipeline(tmp_path / "src", tmp_path / "off", {"ocr": False})
    assert s["quarantined"] == 1 and "rectangle" in s["quarantine"][0]["reason"]


def test_compressed_input_is_decoded_and_written_uncompressed(tmp_path):
    """A JPEG-compressed colour ultrasound-like capture: cleaned pixels are written as Explicit VR
    Little Endian RGB (the transfer syntax written is stated in the file meta)."""
    from pydicom.data import get_testdata_file

    jpeg = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    src = tmp_path / "src" / "sc"
    src.mkdir(parents=True)
    shutil.copy(jpeg, src / "rgb.dcm")
    assert pydicom.dcmread(jpeg).file_meta.TransferSyntaxUID.is_compressed
    pixels = {"clean": "all", "ocr": False, "rectangles": [{"boxes": [[0, 0, 10, 10]]}]}
    s = _pipeline(tmp_path / "src", tmp_path, pixels)
    assert s["anonymized"] == 1, s["quarantine"]
    ds = pydicom.dcmread(_outputs(tmp_path)[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.pixel_array[:10, :10].max() == 0 and ds.pixel_array[10:].max() > 0


def test_options_are_checked():
    with pytest.raises(ValueError, match="rectangles\\[0\\]"):
        redact.options({"rectangles": [{"boxes": [[5, 5, 1, 1]]}]})
    with pytest.raises(ValueError, match="unknown anonymize.pixels option"):
        redact.options({"colour": True})


def test_pixel_text_dates_match_dicom_dates():
    from haven.deid.scan import pixel_text_variants

    text = pixel_text_variants("DOB: 08/29/1951  DOE,JOHN")
    assert "19510829" in text and "doe john" in text.lower()
