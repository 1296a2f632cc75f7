"""The audit: silent on a clean anonymized tree, loud (with places, never values) on leaks."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from haven import keys
from deidrun import anonymize_into, audit_of
from haven.deid.audit import audit_tree, write_audit_result
from haven.deid.identifiers import Identifiers, collect_identifiers
from haven.deid.images import strip_jpeg
from test_anonymize import (INSTITUTION, KEPT_SEQ_NAME, KEY, PATIENTS, REFERRING, SEQ_NAME,
                            build_corpus)

SECRETS = ["DOE^JOHN", "ROE^JANE", "PID-1001-XY", "PID-2002-QZ", INSTITUTION, REFERRING, SEQ_NAME,
           "HAVENCT01", "SN-4455-66", "19700312", "1.2.826.0.1.3680043.9.7777", "ACC1", "SIMPSON",
           "00007041776", "MRN-998877"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-corpus")
    c = build_corpus(root)
    c["out"] = root / "anon"
    anonymize_into(c["source"], c["ingest"], c["out"], KEY)
    return c


def _leaky(corpus, tmp_path: Path) -> Path:
    copy = tmp_path / "anon"
    shutil.copytree(corpus["out"], copy)
    return copy


def _no_values(result: dict) -> None:
    text = json.dumps(result).lower()
    for secret in SECRETS:
        assert secret.lower() not in text, secret


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_clean_output_passes(corpus):
    result = audit_of(corpus["out"], corpus["ingest"])
    assert result["passed"] and result["findings"] == [] and result["files"] == 11
    assert result["identifiers"] > 100


def test_audit_of_the_originals_finds_every_planted_item(corpus):
    result = audit_tree(corpus["source"], corpus["ingest"] / "identifiers.csv")
    assert not result["passed"]
    _no_values(result)
    # the patient's name in the folder name is a finding itself, so the path shows redacted
    doe = corpus["paths"][("PID-1001-XY", 0, 1)].replace("DOE_JOHN/", "[redacted]/")
    where = {(f["file"], f["where"]) for f in result["findings"]}
    kinds = {(f["file"], f["where"]): set() for f in result["findings"]}
    for f in result["findings"]:
        kinds[(f["file"], f["where"])].add(f["kind"])
    expected = [
        "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber",
        "InstitutionName", "ReferringPhysicianName", "PerformingPhysicianName", "StationName",
        "DeviceSerialNumber", "ImageComments", "StudyDate", "AcquisitionDateTime",
        "RequestAttributesSequence[0].ScheduledPerformingPhysicianName",
        "ReferencedImageSequence[0].PersonName", "(0009,1010)",
        "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
        "MediaStorageSOPInstanceUID", "ReferencedImageSequence[0].ReferencedSOPInstanceUID",
        "file name",
    ]
    for w in expected:
        assert (doe, w) in where, w
    # the name in the comment is found as a name, the private tag as the patient id
    assert "PatientName" in kinds[(doe, "ImageComments")]
    assert "PatientID" in kinds[(doe, "(0009,1010)")]
    assert "RequestAttributesSequence[0].ScheduledPerformingPhysicianName" in kinds[
        (doe, "RequestAttributesSequence[0].ScheduledPerformingPhysicianName")]
    # the real CT from deid-data, and the images' metadata
    ct = {w for f, w in where if f == corpus["ct"]}
    assert {"PatientName", "InstitutionName", "(0033,1013)", "RequestAttributesSequence[0].AccessionNumber",
            "OtherPatientNames"} <= ct
    jpeg = {w: kinds[(f, w)] for f, w in where if f == "photos/[redacted]"}
    assert "metadata" in jpeg["JPEG APP1 segment"] and "PatientName" in jpeg["JPEG COM segment"]
    assert "PatientName" in jpeg["JPEG APP1 segment"]
    png = {w: kinds[(f, w)] for f, w in where if f == "[redacted]/[redacted]"}
    assert "metadata" in png["PNG tEXt chunk"] and "PatientID" in png["PNG tEXt chunk"]
    assert "patient_id" in png["file name"]


def test_planted_leaks_in_the_output_are_found(corpus, tmp_path):
    anon = _leaky(corpus, tmp_path)
    manifest = _rows(anon / "manifest.csv")
    target = anon / "data" / manifest[1]["file"]
    ds = pydicom.dcmread(target)
    ds.InstitutionName = INSTITUTION
    ds.ReferencedImageSequence[0].add_new(0x00400006, "PN", SEQ_NAME.replace("^", " "))
    block = ds.private_block(0x0011, "LEAK", create=True)
    block.add_new(0x10, "LO", "x-PID-1001-XY-x")
    ds.save_as(target, enforce_file_format=True)
    other = anon / "data" / manifest[5]["file"]
    ds = pydicom.dcmread(other)
    ds.file_meta.MediaStorageSOPInstanceUID = corpus["rows"][5]["sop_uid"]
    pydicom.dcmwrite(other, ds)  # as is: enforce_file_format would restore the meta UID
    # a leak in the manifest and in a file name
    manifest[2]["label"] = "doe john"
    with open(anon / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(manifest[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(manifest)
    img = anon / "data" / manifest[-1]["file"]
    img.rename(img.with_name("ACC1077880_" + img.name))

    result = audit_of(anon, corpus["ingest"])
    assert not result["passed"]
    _no_values(result)
    found = {(f["file"], f["where"], f["kind"]) for f in result["findings"]}
    assert (manifest[1]["file"], "InstitutionName", "InstitutionName") in found
    assert (manifest[1]["file"], "InstitutionName", "site") in found
    assert (manifest[1]["file"], "ReferencedImageSequence[0].ScheduledPerformingPhysicianName",
            "RequestAttributesSequence[0].ScheduledPerformingPhysicianName") in found
    assert (manifest[1]["file"], "(0011,1010)", "PatientID") in found
    assert (manifest[5]["file"], "MediaStorageSOPInstanceUID", "SOPInstanceUID") in found
    assert ("manifest.csv", "manifest.csv:label", "PatientName") in found
    assert any(w == "file name" and k in ("AccessionNumber", "accession") and "[redacted]" in f
               for f, w, k in found)
    for f in result["findings"]:
        assert set(f) == {"file", "where", "kind"}


def test_dates_are_checked_per_patient(corpus, tmp_path):
    anon = _leaky(corpus, tmp_path)
    manifest = _rows(anon / "manifest.csv")
    doe_dates = PATIENTS["PID-1001-XY"][4]
    roe_dates = PATIENTS["PID-2002-QZ"][4]
    target = anon / "data" / manifest[0]["file"]  # a file of DOE
    ds = pydicom.dcmread(target)
    ds.SeriesDate = roe_dates[0]  # another patient's date identifies nobody here
    ds.save_as(target, enforce_file_format=True)
    assert audit_of(anon, corpus["ingest"])["passed"]
    ds.ContentDate = doe_dates[1]  # the patient's own original date: a leak
    ds.save_as(target, enforce_file_format=True)
    result = audit_of(anon, corpus["ingest"])
    assert {(f["where"], f["kind"]) for f in result["findings"]} >= {("ContentDate", "StudyDate")}
    assert doe_dates[1] not in json.dumps(result)


def test_key_explains_shift_coincidences(tmp_path):
    shift = keys.day_shift(KEY, "P1")
    first = "20200110"
    import datetime as dt

    d = dt.date(2020, 1, 10) + dt.timedelta(days=-shift)
    second = f"{d.year:04d}{d.month:02d}{d.day:02d}"  # shifting it gives exactly `first`
    entries = [("P1", "StudyDate", first), ("P1", "StudyDate", second)]
    assert Identifiers(entries).match(first, "DA", "P1") == {"StudyDate"}
    shifts = {"P1": shift}
    assert Identifiers(entries, shifts).match(first, "DA", "P1") == set()
    assert Identifiers(entries, shifts).match(second, "DA", "P1") == {"StudyDate"}


def test_matching_rules():
    ids = Identifiers([
        ("p", "PatientName", "DOE^JOHN^^"), ("p", "PatientID", "12345678"), ("p", "StationName", "CT1"),
        ("p", "(0019,1092)", "0.9236"), ("p", "StudyDescription", "Brain"),
        ("p", "ImageComments", "call Dr House"), ("p", "PatientName", "ANONYMIZED"),
        ("p", "StudyTime", "101500"), ("p", "StudyDate", "20210310"), ("p", "PatientAge", "051Y"),
    ])
    assert ids.match("Mr doe john was here") == {"PatientName"}
    assert ids.match("JOHN DOE") == {"PatientName"} and ids.match("DOE_JOHN_photo") == {"PatientName"}
    assert ids.match("x12345678y") == {"PatientID"}  # long: substring
    assert ids.match("0.000123456789", "DS") == set()  # ... but not digits inside a number
    assert ids.match("CT1") == {"StationName"} and ids.match("station ct1 b") == {"StationName"}
    assert ids.match("CT12") == set() and ids.match("CT1", "IS") == set()  # short: whole token
    assert ids.match("0.9236", "LO", public=True) == set()  # private values: not in public elements
    assert ids.match("0.9236", "LO", public=False) == {"(0019,1092)"}
    assert ids.match("Brain") == set() and ids.match("call dr house") == {"ImageComments"}
    assert ids.match("ANONYMIZED") == set() and ids.match("101500") == set() and ids.match("051Y") == set()
    assert ids.match("20210310", "DA", "p") == {"StudyDate"} and ids.match("20210310", "DA", "q") == set()
    assert ids.match("20210310101530.5", "DT", "p") == {"StudyDate"}
    assert ids.count == 6 and ids.skipped == 3


def test_image_metadata_is_reported(tmp_path):
    im = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (1.0, 2.0, 3.0)}
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    (tmp_path / "a.jpg").write_bytes(buf.getvalue())
    (tmp_path / "b.jpg").write_bytes(strip_jpeg(buf.getvalue()))
    im.save(tmp_path / "c.tif", tiffinfo={270: "DOE^JOHN"})
    (tmp_path / "notes.txt").write_text("nothing")
    result = audit_tree(tmp_path, {"DOE^JOHN"})
    found = {(f["file"], f["where"], f["kind"]) for f in result["findings"]}
    assert ("a.jpg", "JPEG APP1 segment", "metadata") in found
    assert not any(f == "b.jpg" for f, _, _ in found)
    assert ("c.tif", "TIFF ImageDescription tag", "identifier") in found
    assert ("notes.txt", "file", "unknown file type") in found


def test_write_audit_result_is_atomic_json(tmp_path):
    result = {"passed": False, "files": 2, "findings": [{"file": "a", "where": "b", "kind": "c"}]}
    out = tmp_path / "sub" / "audit.json"
    write_audit_result(result, out)
    assert json.loads(out.read_text()) == result
    write_audit_result({"passed": True, "files": 0, "findings": []}, out)
    assert json.loads(out.read_text())["passed"] is True
    assert [p.name for p in out.parent.iterdir()] == ["audit.json"]


def test_collect_identifiers_walks_sequences_and_private_tags(corpus):
    ds = pydicom.dcmread(corpus["source"] / corpus["paths"][("PID-1001-XY", 0, 1)])
    found = dict(collect_identifiers(ds))
    assert found["RequestAttributesSequence[0].ScheduledPerformingPhysicianName"] == SEQ_NAME
    assert found["ReferencedImageSequence[0].PersonName"] == KEPT_SEQ_NAME
    assert found["(0009,1010)"] == "PID-1001-XY"
    assert "SOPClassUID" not in found  # a standard UID identifies nobody


def test_matching_is_one_pass(tmp_path):
    """Thousands of identifiers against thousands of values: no values x identifiers loop."""
    rng = np.random.default_rng(1)
    entries = [("p", "PatientID", f"ID{n:08d}") for n in rng.integers(0, 10**8, 20000)]
    entries += [("p", "StationName", f"S{n}") for n in range(2000)]
    ids = Identifiers(entries)
    # words sharing the identifiers' prefix: a plain alternation would try all 20000 at each
    texts = [f"value {n} of some text field with id idea identity 1.2.3.{n}" for n in range(5000)]
    t0 = time.perf_counter()
    hits = sum(bool(ids.match(t, "LO")) for t in texts)
    assert hits == 0 and time.perf_counter() - t0 < 3
    assert ids.match(f"xx{entries[7][2]}yy") == {"PatientID"}


def test_incomplete_output_fails_closed(corpus, tmp_path):
    anon = _leaky(corpus, tmp_path)
    (anon / "anonymization.log.csv").unlink()
    (anon / "data" / ".tmp-leftover.part").write_bytes(b"\x00" * 10)
    result = audit_of(anon, corpus["ingest"])
    found = {(f["file"], f["where"], f["kind"]) for f in result["findings"]}
    assert ("anonymization.log.csv", "anonymization.log.csv", "missing") in found
    assert (".tmp-leftover.part", "file", "unknown file type") in found
    with pytest.raises(FileNotFoundError):
        audit_of(anon, tmp_path / "no-ingest")
