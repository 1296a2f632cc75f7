"""De-identification: a PHI-laden corpus built here (DICOM + JPEG + PNG) goes through anonymize().

``build_corpus`` is shared with tests/test_audit.py.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from haven import keys
from deidrun import anonymize_into, audit_of
from haven.deid.anonymize import age_band
from haven.deid.identifiers import collect_identifiers
from haven.deid.images import strip_jpeg
from haven.deid.table import profile_size

KEY = b"test-key-0123456789abcdef-haven!"
OTHER_KEY = b"another-key-0123456789abcdef-xyz"

INGEST_COLUMNS = ["path", "kind", "patient_id", "study_uid", "series_uid", "sop_uid", "accession",
                  "modality", "label", "sex", "age", "site", "rows", "cols"]

PATIENTS = {
    # patient id: (name, folder name, sex, birth date, study dates)
    "PID-1001-XY": ("DOE^JOHN", "DOE_JOHN", "M", "19700312", ("20210310", "20210415")),
    "PID-2002-QZ": ("ROE^JANE", "ROE_JANE", "F", "19850607", ("20190102", "20200229")),
}
INSTITUTION = "SAINT HAVEN HOSPITAL"
REFERRING = "HOUSE^GREGORY"
PERFORMING = "WILSON^JAMES"
SEQ_NAME = "CUDDY^LISA"
KEPT_SEQ_NAME = "CHASE^ROBERT"
STATION = "HAVENCT01"
SERIAL = "SN-4455-66"
PRIVATE_CREATOR = "HAVEN TEST"


def _uid(*parts) -> str:
    return "1.2.826.0.1.3680043.9.7777." + ".".join(str(p) for p in parts)


def _dicom(pid: str, s: int, i: int) -> Dataset:
    name, _, sex, birth, dates = PATIENTS[pid]
    p = 1 if pid.startswith("PID-1") else 2
    study_date = dates[s]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(p, s, 1, i)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "HAVENPACS"
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid(p, s, 1, i)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.AcquisitionDateTime = study_date + "101530.000000"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{p}{s}7788"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "ScanMaster 3000"
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "1 Harbour Road, Havenville"
    ds.ReferringPhysicianName = REFERRING
    ds.PerformingPhysicianName = PERFORMING
    ds.StationName = STATION
    ds.StudyDescription = f"CT HEAD for {name.replace('^', ' ')}"
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.PatientAge = "051Y" if p == 1 else "035Y"
    ds.PatientWeight = "71.5"
    ds.OtherPatientIDs = f"MRN-998877-{p}"
    ds.DeviceSerialNumber = SERIAL
    ds.ImageComments = f"follow-up of {name} (ask {REFERRING})"
    ds.StudyInstanceUID = _uid(p, s)
    ds.SeriesInstanceUID = _uid(p, s, 1)
    ds.FrameOfReferenceUID = _uid(p, s, 9)
    ds.StudyID = f"S{p}{s}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = i + 1
    # a name inside a sequence the profile removes, and one inside a sequence it keeps
    req = Dataset()
    req.ScheduledPerformingPhysicianName = SEQ_NAME
    req.RequestedProcedureID = f"RP-{p}{s}-5566"
    ds.RequestAttributesSequence = Sequence([req])
    if i == 1:  # the second image references the first one of its series
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = _uid(p, s, 1, 0)
        ref.add_new(0x0040A123, "PN", KEPT_SEQ_NAME)  # Person Name, where it has no business
        ds.ReferencedImageSequence = Sequence([ref])
    # a private block holding the patient id
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", pid)
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.PixelData = (np.arange(256, dtype=np.uint16) * (p + s + i + 1)).tobytes()
    return ds


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _dicom_row(rel: str, ds: Dataset, label: str) -> dict:
    age = str(ds.get("PatientAge", "") or "")
    return {
        "path": rel, "kind": "dicom", "patient_id": str(ds.get("PatientID", "") or rel.rsplit(".", 1)[0]),
        "study_uid": str(ds.get("StudyInstanceUID", "")), "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "sop_uid": str(ds.get("SOPInstanceUID", "")), "accession": str(ds.get("AccessionNumber", "")),
        "modality": str(ds.get("Modality", "")), "label": label, "sex": str(ds.get("PatientSex", "")),
        "age": str(int(age[:3])) if age[:3].isdigit() else "", "site": str(ds.get("InstitutionName", "")),
        "rows": ds.get("Rows", ""), "cols": ds.get("Columns", ""),
    }


def write_ingest(ingest: Path, rows: list[dict], identifiers: list[dict]) -> None:
    """The ingest stage's contract (docs/architecture.md): manifest.csv + identifiers.csv."""
    ingest.mkdir(parents=True, exist_ok=True)
    _write_csv(ingest / "manifest.csv", INGEST_COLUMNS, rows)
    _write_csv(ingest / "identifiers.csv", ["patient_id", "tag", "value"], identifiers)


def ct_brain_path() -> str:
    import deid_data

    return os.path.join(os.path.dirname(deid_data.__file__), "data", "humans", "ctbrain1.dcm")


def _jpeg_with_gps() -> bytes:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "HavenCam"  # Make
    exif[0x0131] = "DOE^JOHN phone"  # Software (a name where it should not be)
    exif[0x8825] = {1: "N", 2: (52.0, 22.0, 11.5), 3: "E", 4: (4.0, 53.0, 40.2)}  # GPSInfo
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=90, comment=b"patient DOE^JOHN")
    return buf.getvalue()


def _png_with_text() -> bytes:
    from PIL.PngImagePlugin import PngInfo

    im = Image.fromarray(np.arange(24 * 24, dtype=np.uint8).reshape(24, 24))
    info = PngInfo()
    info.add_text("Comment", "Patient: ROE^JANE, PID-2002-QZ")
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def build_corpus(root: Path) -> dict:
    """Source files + ingest artefacts for 2 patients x 2 studies x 2 images, the deid-data CT,
    a JPEG with EXIF/GPS/comment and a PNG with a text chunk."""
    source, ingest = root / "source", root / "ingest"
    rows, identifiers, paths = [], [], {}
    for pid, (name, folder, *_rest) in PATIENTS.items():
        for s in range(2):
            for i in range(2):
                ds = _dicom(pid, s, i)
                rel = f"{folder}/study{s + 1}/{name.split('^')[0].lower()}_{i + 1}.dcm"
                (source / rel).parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(source / rel, enforce_file_format=True)
                rows.append(_dicom_row(rel, ds, label="bleed" if (s + i) % 2 else "normal"))
                identifiers += [{"patient_id": pid, "tag": t, "value": v} for t, v in collect_identifiers(ds)]
                paths[(pid, s, i)] = rel
    ct_rel = "extra/ctbrain1.dcm"
    (source / ct_rel).parent.mkdir(parents=True, exist_ok=True)
    (source / ct_rel).write_bytes(Path(ct_brain_path()).read_bytes())
    ct = pydicom.dcmread(source / ct_rel)
    rows.append(_dicom_row(ct_rel, ct, label="normal"))
    identifiers += [{"patient_id": str(ct.PatientID), "tag": t, "value": v} for t, v in collect_identifiers(ct)]

    photos = source / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    (photos / "DOE_JOHN_photo.jpg").write_bytes(_jpeg_with_gps())
    (photos / "scan_ROE.png").write_bytes(_png_with_text())
    for rel, pid, sex, age in (("photos/DOE_JOHN_photo.jpg", "PID-1001-XY", "M", "51"),
                               ("photos/scan_ROE.png", "photos/scan_ROE", "F", "35.5")):
        row = {c: "" for c in INGEST_COLUMNS}
        row.update(path=rel, kind="image", patient_id=pid, label="normal", sex=sex, age=age,
                   rows=24, cols=24)
        rows.append(row)
    identifiers.append({"patient_id": "photos/scan_ROE", "tag": "(png text)",
                        "value": "Patient: ROE^JANE, PID-2002-QZ"})
    write_ingest(ingest, rows, identifiers)
    return {"source": source, "ingest": ingest, "rows": rows, "paths": paths, "ct": ct_rel}


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    c = build_corpus(root)
    c["out"] = root / "anon"
    c["summary"] = anonymize_into(c["source"], c["ingest"], c["out"], KEY)
    c["manifest"] = _read_rows(c["out"] / "manifest.csv")
    c["log"] = _read_rows(c["out"] / "anonymization.log.csv")
    return c


def _output_of(c: dict, rel_in: str) -> Path:
    index = next(i for i, r in enumerate(c["rows"]) if r["path"] == rel_in)
    entry = next(r for r in c["log"] if int(r["input_index"]) == index)
    assert entry["status"] == "anonymized", entry
    return c["out"] / "data" / entry["output"]


# ---------------------------------------------------------------------------------------------


def test_profile_table_is_large_and_well_formed():
    from haven.deid.table import load_profile

    table = load_profile()
    assert profile_size() >= 650
    assert table["(0010,0010)"] == "Z" and table["(0020,000d)"] == "U" and table["(0008,0080)"] == "D"
    assert set(table.values()) <= {"X", "Z", "D", "U", "K", "C"}


def test_profile_table_holds_every_attribute_of_the_standard():
    """Against the 2026c edition of Table E.1-1 (dicom-anonymizer's machine-readable copy): every
    attribute present, with the action its compound code resolves to."""
    from haven.deid import ps315
    from haven.deid.table import PROFILE_PATH, load_profile

    standard = ps315.standard_table()
    assert len(standard) >= 650
    table = load_profile()
    assert ps315.missing(PROFILE_PATH) == []
    wrong = {t: (a, table[t]) for t, (_, a) in standard.items() if table.get(t) != a}
    assert not wrong


def test_summary_log_and_manifest(corpus):
    assert corpus["summary"] == {"inputs": 11, "anonymized": 11, "quarantined": 0}
    assert [int(r["input_index"]) for r in corpus["log"]] == list(range(11))
    assert all(r["status"] == "anonymized" and int(r["actions"]) > 0 for r in corpus["log"])
    m = corpus["manifest"]
    assert list(m[0]) == ["file", "kind", "patient", "study", "series", "label", "sex", "age_band",
                          "site", "modality", "role", "mask"]
    first = m[0]
    assert first["patient"] == keys.pseudonym(KEY, "PID-1001-XY")
    assert first["study"] == keys.uid(KEY, corpus["rows"][0]["study_uid"])
    assert first["series"] == keys.uid(KEY, corpus["rows"][0]["series_uid"])
    assert first["age_band"] == "50-59" and first["sex"] == "M" and first["modality"] == "CT"
    assert first["site"] == keys.pseudonym(KEY, INSTITUTION, prefix="S", length=6)
    png = next(r for r in m if r["file"].endswith(".png"))
    assert png["age_band"] == "30-39" and png["study"] == "" and png["kind"] == "image"
    assert (corpus["out"] / "quarantine.csv").read_text().strip() == "input_index,reason"


def test_audit_passes_after_anonymization(corpus):
    result = audit_of(corpus["out"], corpus["ingest"])
    assert result["findings"] == []
    assert result["passed"] and result["files"] == 11


def test_dicom_header_is_deidentified(corpus):
    out = _output_of(corpus, corpus["paths"][("PID-1001-XY", 0, 1)])
    ds = pydicom.dcmread(out)
    pseudo = keys.pseudonym(KEY, "PID-1001-XY")
    assert ds.PatientID == pseudo and str(ds.PatientName) == pseudo
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    # one value per profile and option (LO holds at most 64 characters a value), in code order
    assert list(ds.DeidentificationMethod) == [
        "haven: Basic Application Confidentiality Profile",
        "Retain Longitudinal Temporal Information Modified Dates Option",
        "Retain Patient Characteristics Option", "Retain Device Identity Option"]
    codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107", "113108", "113109"}
    assert all(item.CodingSchemeDesignator == "DCM" for item in ds.DeidentificationMethodCodeSequence)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    assert ds.SOPInstanceUID.startswith("2.25.") and ds.StudyInstanceUID.startswith("2.25.")
    # removed / emptied / dummied
    for kw in ("OtherPatientIDs", "ImageComments", "PerformingPhysicianName", "InstitutionAddress",
               "RequestAttributesSequence", "StudyDescription"):
        assert kw not in ds, kw
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == "" and ds.ReferringPhysicianName == ""
    assert ds.InstitutionName == "ANONYMIZED"
    assert not any(elem.tag.is_private for elem in ds.iterall())
    # every PN anywhere is emptied (except the patient's own pseudonym)
    names = [str(e.value) for e in ds.iterall() if e.VR == "PN"]
    assert names and all(n in ("", pseudo) for n in names)
    # kept for the images and the subgroups
    assert ds.PatientSex == "M" and ds.PatientAge == "051Y" and ds.PatientWeight == 71.5
    assert ds.Manufacturer == "ACME" and ds.ManufacturerModelName == "ScanMaster 3000"
    assert ds.StationName == keys.pseudonym(KEY, STATION, prefix="D", length=10)
    assert ds.DeviceSerialNumber != SERIAL and ds.DeviceSerialNumber.startswith("D")
    assert ds.Modality == "CT" and ds.Rows == 16 and ds.RescaleIntercept == -1024
    assert ds.WindowCenter == 40 and ds.StudyTime == "101500"
    original = pydicom.dcmread(corpus["source"] / corpus["paths"][("PID-1001-XY", 0, 1)])
    assert ds.PixelData == original.PixelData


def test_references_stay_consistent_across_files(corpus):
    first = pydicom.dcmread(_output_of(corpus, corpus["paths"][("PID-2002-QZ", 1, 0)]))
    second = pydicom.dcmread(_output_of(corpus, corpus["paths"][("PID-2002-QZ", 1, 1)]))
    ref = second.ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == CTImageStorage  # standard UIDs are kept
    assert str(ref[0x0040A123].value) == ""
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    assert first.FrameOfReferenceUID == keys.uid(KEY, _uid(2, 1, 9))
    ct = pydicom.dcmread(_output_of(corpus, corpus["ct"]))
    # the CT references its own study in ReferencedStudySequence's original UID: same mapping
    assert ct.SourceImageSequence[0].ReferencedSOPInstanceUID == ct.IrradiationEventUID


def _date(s: str) -> dt.date:
    return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))


def test_dates_shift_per_patient_and_keep_intervals(corpus):
    for pid, (_, _, _, _, dates) in PATIENTS.items():
        shift = keys.day_shift(KEY, pid)
        new = []
        for s in range(2):
            ds = pydicom.dcmread(_output_of(corpus, corpus["paths"][(pid, s, 0)]))
            assert _date(ds.StudyDate) - _date(dates[s]) == dt.timedelta(days=shift)
            assert ds.SeriesDate == ds.ContentDate == ds.StudyDate
            assert ds.AcquisitionDateTime == ds.StudyDate + "101530.000000"
            new.append(_date(ds.StudyDate))
        assert new[1] - new[0] == _date(dates[1]) - _date(dates[0])


def test_patient_id_is_keyed(corpus, tmp_path):
    other = tmp_path / "anon-other-key"
    anonymize_into(corpus["source"], corpus["ingest"], other, OTHER_KEY)
    rows = _read_rows(other / "manifest.csv")
    assert rows[0]["patient"] == keys.pseudonym(OTHER_KEY, "PID-1001-XY") != corpus["manifest"][0]["patient"]
    assert rows[0]["file"] != corpus["manifest"][0]["file"]


def test_demo_key_created_by_jobs_starting_at_once_is_one_whole_key(tmp_path):
    """The anonymize shards of a demo start together and each creates the demo key if it is
    missing: none may fail, all must read the same whole key, and it stays private (0600)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    for round_ in range(20):
        path = tmp_path / f"r{round_}" / ".secrets" / "demo.key"
        start = threading.Barrier(8)

        def job():
            start.wait()
            keys.create_key(path)
            return keys.load_key(path)

        with ThreadPoolExecutor(8) as pool:
            got = [f.result() for f in [pool.submit(job) for _ in range(8)]]
        assert len(set(got)) == 1 and len(got[0]) == 64
        assert path.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["demo.key"]  # no private temporary left


def test_output_names_contain_no_input_names(corpus):
    words = set()
    for row in corpus["rows"]:
        for part in Path(row["path"]).parts:
            words.add(Path(part).stem.lower())
        words.add(row["patient_id"].lower())
        for c in ("study_uid", "series_uid", "sop_uid", "accession"):
            if row[c]:
                words.add(row[c].lower())
    words |= {"doe", "john", "roe", "jane"}
    outputs = [p.relative_to(corpus["out"] / "data").as_posix().lower()
               for p in (corpus["out"] / "data").rglob("*")]
    assert len([p for p in (corpus["out"] / "data").rglob("*") if p.is_file()]) == 11
    for out in outputs:
        for w in words:
            assert w not in out, (w, out)


def test_twice_is_byte_identical(corpus, tmp_path):
    again = tmp_path / "anon-again"
    anonymize_into(corpus["source"], corpus["ingest"], again, KEY)
    assert _tree_digest(again) == _tree_digest(corpus["out"])
    # and re-running into the same folder changes nothing either
    before = _tree_digest(corpus["out"])
    anonymize_into(corpus["source"], corpus["ingest"], corpus["out"], KEY)
    assert _tree_digest(corpus["out"]) == before


def test_truncated_and_missing_files_are_quarantined(corpus, tmp_path):
    source = tmp_path / "src"
    ingest = tmp_path / "ingest"
    good = corpus["source"] / corpus["paths"][("PID-1001-XY", 0, 0)]
    data = good.read_bytes()
    (source / "a").mkdir(parents=True)
    (source / "a" / "DOE_cut.dcm").write_bytes(data[: len(data) - 300])  # inside the pixel data
    (source / "a" / "DOE_head.dcm").write_bytes(data[:700])  # inside the header
    (source / "a" / "ok.dcm").write_bytes(data)
    (source / "a" / "photo.jpg").write_bytes(_jpeg_with_gps()[:200])
    ds = pydicom.dcmread(good)
    rows = [_dicom_row("a/DOE_cut.dcm", ds, "x"), _dicom_row("a/DOE_head.dcm", ds, "x"),
            _dicom_row("a/ok.dcm", ds, "x"), _dicom_row("a/missing.dcm", ds, "x"),
            {**{c: "" for c in INGEST_COLUMNS}, "path": "a/photo.jpg", "kind": "image", "patient_id": "x"}]
    write_ingest(ingest, rows, [])
    out = tmp_path / "anon"
    summary = anonymize_into(source, ingest, out, KEY)
    assert summary == {"inputs": 5, "anonymized": 1, "quarantined": 4}
    quarantine = _read_rows(out / "quarantine.csv")
    # rows of ingest/manifest.csv, never the input paths (which carry names here)
    assert [q["input_index"] for q in quarantine] == ["0", "1", "3", "4"]
    assert all(q["reason"] and "DOE" not in q["reason"] and "PID" not in q["reason"] for q in quarantine)
    files = [p for p in (out / "data").rglob("*") if p.is_file()]
    assert len(files) == 1 and not any(p.name.startswith(".tmp") for p in (out / "data").rglob("*"))
    log_rows = _read_rows(out / "anonymization.log.csv")
    assert [r["status"] for r in log_rows] == ["quarantined", "quarantined", "anonymized",
                                               "quarantined", "quarantined"]


def test_jpeg_pixels_untouched_and_metadata_gone(corpus):
    src = corpus["source"] / "photos/DOE_JOHN_photo.jpg"
    out = _output_of(corpus, "photos/DOE_JOHN_photo.jpg")
    assert out.suffix == ".jpg" and out.parent == corpus["out"] / "data"
    with Image.open(src) as a, Image.open(out) as b:
        assert len(a.getexif().get_ifd(0x8825)) > 0 and "comment" in a.info  # GPS in the input
        assert len(b.getexif()) == 0 and len(b.getexif().get_ifd(0x8825)) == 0
        assert "comment" not in b.info and "exif" not in b.info
        assert np.array_equal(np.asarray(a), np.asarray(b))
    data = out.read_bytes()
    assert b"Exif" not in data and b"DOE" not in data and b"HavenCam" not in data
    assert strip_jpeg(data) == data  # idempotent


def test_png_text_chunk_removed_pixels_kept(corpus):
    src = corpus["source"] / "photos/scan_ROE.png"
    out = _output_of(corpus, "photos/scan_ROE.png")
    with Image.open(src) as a, Image.open(out) as b:
        assert a.text and not getattr(b, "text", {})
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.mode == b.mode
    assert b"tEXt" not in out.read_bytes()


def test_options_change_the_profile(corpus, tmp_path):
    out = tmp_path / "strict"
    anonymize_into(corpus["source"], corpus["ingest"], out, KEY,
                   {"retain_device_identity": False, "retain_patient_characteristics": False,
                    "retain_longitudinal_modified_dates": False, "age_band_width": 5})
    rows = _read_rows(out / "manifest.csv")
    assert rows[0]["age_band"] == "50-54"
    ds = pydicom.dcmread(out / "data" / rows[0]["file"])
    assert {i.CodeValue for i in ds.DeidentificationMethodCodeSequence} == {"113100"}
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert "PatientAge" not in ds and "PatientWeight" not in ds and ds.PatientSex == ""
    assert ds.StudyDate == "" and "StudyTime" in ds and ds.StudyTime == ""
    assert ds.StationName == "ANONYMIZED" and ds.DeviceSerialNumber == "ANONYMIZED"
    assert audit_of(out, corpus["ingest"])["passed"]
    with pytest.raises(ValueError, match="unknown anonymize option"):
        anonymize_into(corpus["source"], corpus["ingest"], out, KEY, {"retain_everything": True})


def test_clean_descriptors_and_retain_uids(corpus, tmp_path):
    """The two options the basic profile leaves off: descriptions kept without the file's names,
    ids and dates; original UIDs kept.  The audit passes only when told the options were on."""
    out = tmp_path / "descriptors"
    anonymize_into(corpus["source"], corpus["ingest"], out, KEY, {"clean_descriptors": True, "retain_uids": True})
    log_rows = _read_rows(out / "anonymization.log.csv")
    rel = corpus["paths"][("PID-1001-XY", 0, 1)]
    index = next(i for i, r in enumerate(corpus["rows"]) if r["path"] == rel)
    entry = next(r for r in log_rows if int(r["input_index"]) == index)
    ds = pydicom.dcmread(out / "data" / entry["output"])
    assert ds.StudyDescription == "CT HEAD for"
    assert ds.ImageComments.startswith("follow-up of") and "DOE" not in ds.ImageComments.upper()
    assert "HOUSE" not in ds.ImageComments.upper() and "GREGORY" not in ds.ImageComments.upper()
    assert ds.SOPInstanceUID == _uid(1, 0, 1, 1) and ds.StudyInstanceUID == _uid(1, 0)
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == _uid(1, 0, 1, 0)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    codes = {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}
    assert {"113105", "113110"} <= codes
    assert audit_of(out, corpus["ingest"], clean_descriptors=True, retain_uids=True)["passed"]
    kinds = {f["kind"] for f in audit_of(out, corpus["ingest"])["findings"]}
    assert "SOPInstanceUID" in kinds  # a gate told nothing sees the kept UIDs as leaks
    from haven.deid.header import scrub

    assert scrub("Seen 03/12/1970 MRN 99887766", None) == "Seen MRN"


def test_age_band():
    assert age_band("45", 10) == "40-49" and age_band(45.9, 5) == "45-49"
    assert age_band("", 10) == "" and age_band("abc", 10) == "" and age_band("93", 10) == "90+"
    assert age_band("0.5", 10) == "0-9" and age_band("85", 20) == "80-89"


# ---------------------------------------------------------------------------------------------
# pydicom's own test files: whatever they contain, nothing escapes and the audit passes


def test_pydicom_test_corpus(tmp_path):
    from pydicom.data import get_testdata_file

    folder = Path(os.path.dirname(get_testdata_file("CT_small.dcm")))
    rows, identifiers, unreadable = [], [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            unreadable.append(rel)
            continue
        row = _dicom_row(rel, ds, label="x")
        rows.append(row)
        try:
            identifiers += [{"patient_id": row["patient_id"], "tag": t, "value": v}
                            for t, v in collect_identifiers(ds)]
        except Exception:
            pass
    assert len(rows) > 40
    ingest = tmp_path / "ingest"
    write_ingest(ingest, rows, identifiers)
    out = tmp_path / "anon"
    t0 = time.perf_counter()
    summary = anonymize_into(folder, ingest, out, KEY)
    elapsed = time.perf_counter() - t0
    assert summary["inputs"] == len(rows)
    assert summary["anonymized"] + summary["quarantined"] == len(rows)
    assert summary["anonymized"] >= 60  # the rest: DICOMDIRs, header-only/truncated files, duplicates
    quarantine = _read_rows(out / "quarantine.csv")
    assert len(quarantine) == summary["quarantined"] and all(q["reason"] for q in quarantine)
    log_rows = _read_rows(out / "anonymization.log.csv")
    assert len(log_rows) == len(rows)
    result = audit_of(out, ingest)
    assert result["passed"], result["findings"][:20]
    print(f"\npydicom corpus: {len(rows)} readable ({len(unreadable)} unreadable skipped), "
          f"{summary['anonymized']} anonymized, {summary['quarantined']} quarantined in {elapsed:.1f}s")
    known = ("DICOMDIR", "duplicate SOPInstanceUID", "without pixel data", "truncated",
             "missing SOPInstanceUID", "pixel description",
             "re-encoded after cleaning")  # burned-in text cleaning: big-endian or 32-bit colour pixels
    for q in quarantine:
        print(f"  quarantined {rows[int(q['input_index'])]['path']}: {q['reason']}")
        assert any(k in q["reason"] for k in known), q


def test_retain_safe_private(tmp_path):
    """Allow-listed private elements (and their creator) are kept as read; the rest of the block, and
    the same offset under another creator, are removed; the gate passes only when told."""
    from haven.deid.profile import safe_private_table
    from haven.ingest import ingest

    ds = _dicom("PID-1001-XY", 0, 0)
    safe = ds.private_block(0x0029, "ACME SAFE", create=True)
    safe.add_new(0x10, "LO", "KERNEL B30 SHARP")
    safe.add_new(0x11, "LO", "PID-1001-XY")
    other = ds.private_block(0x0029, "SOMEONE ELSE", create=True)
    other.add_new(0x10, "LO", "DOE JOHN PRIVATE NOTE")
    src = tmp_path / "src" / "ct"
    src.mkdir(parents=True)
    ds.save_as(src / "a.dcm", enforce_file_format=True)
    ingest(tmp_path / "src", tmp_path / "ingest")
    allow = [{"group": "0029", "creator": "ACME SAFE", "elements": ["10"]}]
    out = tmp_path / "anon"
    anonymize_into(tmp_path / "src", tmp_path / "ingest", out, KEY, {"safe_private": allow})
    res = pydicom.dcmread(next((out / "data").rglob("*.dcm")))
    private = {(e.tag.group, e.tag.element & 0xFF): str(e.value) for e in res if e.tag.is_private}
    block = res.private_block(0x0029, "ACME SAFE")
    assert block[0x10].value == "KERNEL B30 SHARP"
    assert 0x11 not in block and "SOMEONE ELSE" not in private.values()
    assert "DOE JOHN PRIVATE NOTE" not in private.values() and "PID-1001-XY" not in private.values()
    assert "113111" in {i.CodeValue for i in res.DeidentificationMethodCodeSequence}
    assert audit_of(out, tmp_path / "ingest", safe_private=allow)["passed"]
    assert not audit_of(out, tmp_path / "ingest")["passed"]  # the kept value is a private value seen at ingest
    with pytest.raises(ValueError, match="safe_private\\[0\\]"):
        safe_private_table([{"group": "0010", "creator": "X", "elements": ["10"]}])
