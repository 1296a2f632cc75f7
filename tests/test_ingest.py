"""Ingest: manifest, identifiers and quarantine for image folders, DICOM projects and junk."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from haven import demo
from haven.ingest import MANIFEST_COLUMNS, ingest
from haven.sources.dicomheader import age_years


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    demo.make_digits(root / "src")
    summary = ingest(root / "src", root / "ingest")
    return root / "src", root / "ingest", summary


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    root = tmp_path_factory.mktemp("brain")
    demo.make_brain_ct(root / "demo", n_patients=60)
    summary = ingest(root / "demo" / "dicom", root / "ingest", labels=root / "demo" / "labels.csv",
                     label_key="accession")
    return root / "demo", root / "ingest", summary


def _ct(path: Path, patient_id="PAT001", accession="ACC001", name="DOE^JANE", implicit=False, **extra) -> Path:
    """A small valid CT file (8x8) with a few identifying values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.PatientName, ds.PatientID, ds.AccessionNumber = name, patient_id, accession
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------
# the two demo projects


def test_digits_ingest(digits):
    src, out, summary = digits
    assert summary == {"files": 1798, "accepted": 1797, "quarantined": 1, "patients": 1797}
    assert _header(out / "manifest.csv") == MANIFEST_COLUMNS
    rows = _read(out / "manifest.csv")
    assert len(rows) == 1797
    assert all(r["kind"] == "image" and (r["rows"], r["cols"]) == ("8", "8") for r in rows)
    assert all(r["label"] == r["path"].split("/")[0] for r in rows)
    assert {r["label"] for r in rows} == {str(i) for i in range(10)}
    assert rows[0]["patient_id"] == rows[0]["path"].rsplit(".", 1)[0]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    q = _read(out / "quarantine.csv")
    assert [r["path"] for r in q] == ["3/corrupt.png"] and q[0]["reason"]
    assert str(src) not in q[0]["reason"]  # no absolute paths in reasons
    assert _read(out / "identifiers.csv") == []


def test_brain_ingest_accepts_good_slices_and_labels_by_accession(brain):
    demo_dir, out, summary = brain
    # 240 CT slices, and a DICOM-SEG of the lesions for each of the 30 hemorrhage series
    assert summary == {"files": 272, "accepted": 270, "quarantined": 2, "patients": 60}
    every = _read(out / "manifest.csv")
    segs = [r for r in every if r["role"] == "mask"]
    assert len(segs) == 30 and {r["modality"] for r in segs} == {"SEG"}
    rows = [r for r in every if r["role"] == "image"]
    assert len(rows) == 240
    labels = {r["accession"]: r["label"] for r in _read(demo_dir / "labels.csv")}
    assert {labels[r["accession"]] for r in segs} == {"hemorrhage"}
    for r in rows:
        assert r["kind"] == "dicom" and r["modality"] == "CT"
        assert r["label"] == labels[r["accession"]]
        assert (demo_dir / "dicom" / r["path"]).is_file() and not r["path"].startswith("/")
        assert r["sex"] in ("M", "F") and 20 <= float(r["age"]) <= 90 and r["site"]
        assert (r["rows"], r["cols"]) == ("512", "512")
    one = rows[7]
    ds = pydicom.dcmread(demo_dir / "dicom" / one["path"], stop_before_pixels=True)
    assert (one["patient_id"], one["study_uid"], one["series_uid"], one["sop_uid"]) == (
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert one["age"] == str(int(ds.PatientAge[:3])) and one["site"] == ds.InstitutionName
    assert len({r["sop_uid"] for r in rows}) == 240


def test_brain_ingest_quarantines_planted_files(brain):
    _, out, _ = brain
    q = {r["path"]: r["reason"] for r in _read(out / "quarantine.csv")}
    assert set(q) == {"truncated.dcm", "notes.dcm"}
    assert "not DICOM" in q["notes.dcm"]
    assert "truncated" in q["truncated.dcm"]


def test_brain_identifiers(brain):
    demo_dir, out, _ = brain
    ids = _read(out / "identifiers.csv")
    assert _header(out / "identifiers.csv") == ["patient_id", "tag", "value"]
    manifest_patients = {r["patient_id"] for r in _read(out / "manifest.csv")}
    assert {r["patient_id"] for r in ids} == manifest_patients
    ds = pydicom.dcmread(next((demo_dir / "dicom").glob("HOSP*/*/2.dcm")), stop_before_pixels=True)
    mine = {(r["tag"], r["value"]) for r in ids if r["patient_id"] == ds.PatientID}
    family, given = str(ds.PatientName).split("^")[:2]
    expected = {
        ("PatientName", str(ds.PatientName)),
        ("PatientID", ds.PatientID),
        ("OtherPatientIDs", ds.OtherPatientIDs),
        ("AccessionNumber", ds.AccessionNumber),
        ("PatientBirthDate", ds.PatientBirthDate),
        ("StudyDate", ds.StudyDate),
        ("InstitutionName", ds.InstitutionName),
        ("InstitutionAddress", ds.InstitutionAddress),
        ("StationName", ds.StationName),
        ("ReferringPhysicianName", str(ds.ReferringPhysicianName)),
        ("SOPInstanceUID", ds.SOPInstanceUID),
        ("StudyInstanceUID", ds.StudyInstanceUID),
        ("ImageComments", ds.ImageComments),
        ("(0009,1010)", ds.PatientID),
        ("(0009,1011)", f"{family}, {given}"),
        ("RequestAttributesSequence[0].RequestingPhysician", str(ds.RequestAttributesSequence[0].RequestingPhysician)),
        ("RequestAttributesSequence[0].RequestedProcedureID", ds.AccessionNumber),
        ("ReferencedImageSequence[0].ReferencedSOPInstanceUID", ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID),
    }
    assert expected <= mine, expected - mine
    values = [r["value"] for r in ids]
    assert not any(v.startswith("1.2.840.10008.") for v in values)  # standard UIDs are not PHI
    assert all(len(v.strip()) >= 3 for v in values)
    assert ("(0009,0010)", "HAVEN_DEMO") not in mine  # private creators are skipped
    assert len(ids) == len({(r["patient_id"], r["tag"], r["value"]) for r in ids})  # deduplicated


def test_outputs_are_written_atomically_without_leftovers(brain):
    _, out, _ = brain
    assert sorted(p.name for p in out.iterdir()) == ["identifiers.csv", "manifest.csv", "quarantine.csv"]


# ---------------------------------------------------------------------------------------------
# labels


def test_missing_label_row_quarantines_that_patients_files(tmp_path, brain):
    demo_dir, _, _ = brain
    rows = _read(demo_dir / "labels.csv")
    dropped = rows[0]["accession"]
    table = tmp_path / "my_labels.csv"
    table.write_text("accession,label\n" + "".join(f"{r['accession']},{r['label']}\n" for r in rows[1:]))
    summary = ingest(demo_dir / "dicom", tmp_path / "out", labels=table, label_key="accession")
    seg = int(rows[0]["label"] == "hemorrhage")  # the dropped patient's DICOM-SEG goes with their 4 slices
    assert summary["accepted"] == 236 + 30 - seg and summary["quarantined"] == 6 + seg and summary["patients"] == 59
    q = _read(tmp_path / "out" / "quarantine.csv")
    unlabeled = [r for r in q if r["reason"] == "no label for this file in my_labels.csv"]
    assert len(unlabeled) == 4 + seg
    assert all(dropped not in r["reason"] for r in q)  # the key itself is not echoed
    assert dropped not in {r["accession"] for r in _read(tmp_path / "out" / "manifest.csv")}


def test_bad_labels_file_raises_naming_file_and_column(tmp_path):
    src = tmp_path / "src"
    _ct(src / "a.dcm")
    with pytest.raises(ValueError, match=r"nope\.csv.*not found"):
        ingest(src, tmp_path / "out", labels=tmp_path / "nope.csv", label_key="accession")
    bad = tmp_path / "bad_table.csv"
    bad.write_text("accession_number,diagnosis\nACC001,normal\n")
    with pytest.raises(ValueError, match=r"bad_table\.csv.*'accession'.*accession_number"):
        ingest(src, tmp_path / "out", labels=bad, label_key="accession")
    bad.write_text("accession,diagnosis\nACC001,normal\n")
    with pytest.raises(ValueError, match=r"bad_table\.csv.*'label'.*label_column"):
        ingest(src, tmp_path / "out", labels=bad, label_key="accession")
    with pytest.raises(ValueError, match="label_key"):
        ingest(src, tmp_path / "out", labels=bad, label_key="PatientName")
    assert not (tmp_path / "out").exists()  # nothing written on a configuration error


def test_labels_by_patient_id_and_custom_column(tmp_path):
    src = tmp_path / "src"
    _ct(src / "p1" / "1.dcm", patient_id="PAT001", accession="A1")
    _ct(src / "p1" / "2.dcm", patient_id="PAT001", accession="A1")
    _ct(src / "p2" / "1.dcm", patient_id="0042", accession="A2")
    table = tmp_path / "t.csv"
    table.write_bytes("patient_id,diagnosis,label\nPAT001,bleed,x\n0042,normal,y\n".encode("utf-8-sig"))
    summary = ingest(src, tmp_path / "out", labels=table, label_key="patient_id", label_column="diagnosis")
    assert summary == {"files": 3, "accepted": 3, "quarantined": 0, "patients": 2}
    rows = {r["path"]: r for r in _read(tmp_path / "out" / "manifest.csv")}
    assert rows["p2/1.dcm"]["label"] == "normal"  # leading zeros of the key kept
    assert rows["p1/2.dcm"]["label"] == "bleed"
    assert _header(tmp_path / "out" / "quarantine.csv") == ["path", "reason"]
    assert _read(tmp_path / "out" / "quarantine.csv") == []


def test_images_with_path_keyed_table_and_patient_column(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.jpg", "c.png"):
        Image.new("RGB", (5, 7), (10, 20, 30)).save(src / name)
    table = tmp_path / "t.csv"
    table.write_text("path,label,patient\n./a.png,leaf,plant-1\nb.jpg,root,plant-2\n")
    summary = ingest(src, tmp_path / "out", labels=table, label_key="path")
    assert summary == {"files": 3, "accepted": 2, "quarantined": 1, "patients": 2}
    rows = {r["path"]: r for r in _read(tmp_path / "out" / "manifest.csv")}
    assert rows["a.png"]["patient_id"] == "plant-1" and rows["a.png"]["label"] == "leaf"
    assert (rows["b.jpg"]["rows"], rows["b.jpg"]["cols"]) == ("7", "5")
    assert _read(tmp_path / "out" / "quarantine.csv")[0]["path"] == "c.png"


# ---------------------------------------------------------------------------------------------
# robustness


def test_pydicom_test_files_never_crash(tmp_path, caplog):
    import logging
    import warnings

    from pydicom.data import get_testdata_file

    folder = Path(os.path.dirname(get_testdata_file("CT_small.dcm")))
    n_files = sum(1 for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = ingest(folder, tmp_path / "plain")
    # pydicom's warnings quote header values: none may escape into logs
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    assert not caught
    assert logging.getLogger("pydicom").level != logging.CRITICAL + 1  # level restored
    assert summary["files"] == summary["accepted"] + summary["quarantined"] == n_files
    q = _read(tmp_path / "plain" / "quarantine.csv")
    assert len(q) == summary["quarantined"] and all(r["reason"].strip() for r in q)
    assert summary["accepted"] > 0 and summary["quarantined"] > 0
    reasons = {r["path"]: r["reason"] for r in q}
    assert reasons["rtplan.dcm"] == "no pixel data"

    assert reasons["README.txt"].startswith("not DICOM")
    assert "decoded" in reasons["MR_truncated.dcm"]
    # with a path-keyed table every root-level file gets a label: good images are then accepted
    table = tmp_path / "all.csv"
    table.write_text("path,label\n" + "".join(f"{p.name},x\n" for p in sorted(folder.iterdir()) if p.is_file()))
    summary = ingest(folder, tmp_path / "keyed", labels=table, label_key="path")
    accepted = {r["path"] for r in _read(tmp_path / "keyed" / "manifest.csv")}
    assert {"CT_small.dcm", "MR_small.dcm", "J2K_pixelrep_mismatch.dcm"} <= accepted
    assert summary["files"] == n_files
    reasons = {r["path"]: r["reason"] for r in _read(tmp_path / "keyed" / "quarantine.csv")}
    # pydicom ships the same instance in several encodings: only the first copy is kept
    assert reasons["MR_small_bigendian.dcm"] == "duplicate: same SOPInstanceUID as MR_small.dcm"
    ids = {(r["tag"], r["value"]) for r in _read(tmp_path / "keyed" / "identifiers.csv")}
    assert ("(0009,1040)", "Patient,The") in ids  # a name hidden in a private tag of JPEG2000.dcm
    assert not any(v in ("0.000000", "1.000000") for _, v in ids)  # vendor numbers are not PHI


def test_reasons_carry_no_header_values(tmp_path):
    src = tmp_path / "cls"
    good = _ct(src / "ok.dcm")
    ds = pydicom.dcmread(good)
    ds.PatientName = "SECRET^NAME"
    ds.Rows = 99  # pixel data too short for the header: cannot be decoded
    ds.save_as(src / "broken.dcm")
    ds = pydicom.dcmread(good)
    ds.PatientName = "OTHER^SECRET"
    del ds.PixelData
    ds.save_as(src / "nopixels.dcm")
    (src / "empty.png").write_bytes(b"")
    summary = ingest(tmp_path, tmp_path / "out")
    assert summary["accepted"] == 1 and summary["quarantined"] == 3
    q = {r["path"]: r["reason"] for r in _read(tmp_path / "out" / "quarantine.csv")}
    assert q["cls/nopixels.dcm"] == "no pixel data"
    assert q["cls/broken.dcm"].startswith("pixel data cannot be decoded")
    assert q["cls/empty.png"]
    assert not any("SECRET" in r or str(tmp_path) in r for r in q.values())


def test_hidden_files_and_symlinks(tmp_path):
    src = tmp_path / "src"
    _ct(src / "cls" / "a.dcm")
    _ct(src / ".hidden" / "b.dcm")
    _ct(src / "cls" / ".c.dcm")
    outside = _ct(tmp_path / "elsewhere" / "d.dcm")
    (src / "cls" / "link_out.dcm").symlink_to(outside)
    (src / "cls" / "link_in.dcm").symlink_to(src / "cls" / "a.dcm")
    (src / "cls" / "dangling.dcm").symlink_to(tmp_path / "missing.dcm")
    (src / "dirlink").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    summary = ingest(src, src / "ingest-out")  # output inside the source is not walked
    q = {r["path"]: r["reason"] for r in _read(src / "ingest-out" / "quarantine.csv")}
    accepted = [r["path"] for r in _read(src / "ingest-out" / "manifest.csv")]
    assert accepted == ["cls/a.dcm"]
    assert q["cls/link_in.dcm"] == "duplicate: same SOPInstanceUID as cls/a.dcm"
    assert "outside the source" in q["cls/link_out.dcm"]
    assert "broken" in q["cls/dangling.dcm"]
    assert "not followed" in q["dirlink"]
    assert summary["files"] == 5


def test_dicom_without_preamble_is_accepted_only_with_pixels(tmp_path):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    ds = pydicom.dcmread(_ct(tmp_path / "template" / "t.dcm"))
    del ds.file_meta  # a bare dataset, as some old exports write it: no preamble, no meta
    ds.preamble = None
    pydicom.dcmwrite(src / "IM0001", ds, implicit_vr=True, little_endian=True)
    del ds.PixelData
    pydicom.dcmwrite(src / "IM0002", ds, implicit_vr=True, little_endian=True)
    assert (src / "IM0001").read_bytes()[:2] == b"\x08\x00"
    (src / "IM0003").write_bytes(b"\x08\x00\x05\x00garbage that only starts like a tag" * 3)
    (src / "IM0004").write_bytes(bytes(range(200, 256)) * 4)
    summary = ingest(tmp_path / "src", tmp_path / "out")
    rows = _read(tmp_path / "out" / "manifest.csv")
    assert [(r["path"], r["label"], r["kind"]) for r in rows] == [("cls/IM0001", "cls", "dicom")]
    q = {r["path"]: r["reason"] for r in _read(tmp_path / "out" / "quarantine.csv")}
    assert set(q) == {"cls/IM0002", "cls/IM0003", "cls/IM0004"} and summary["files"] == 4
    assert q["cls/IM0002"] == "no pixel data"
    assert q["cls/IM0004"].startswith("not DICOM")
    assert all(q.values())


def test_identifiers_from_nested_sequences_private_un_and_other_ids(tmp_path):
    src = tmp_path / "cls"
    other = Dataset()
    other.PatientID = "ALT-7781"
    other.IssuerOfPatientID = "OTHERHOSP"
    path = _ct(src / "a.dcm", implicit=True, OtherPatientIDsSequence=[other],
               AdditionalPatientHistory="seen by Dr Who at home", PatientSex="F", PatientAge="006M")
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0011, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "Private Secret Value")
    block.add_new(0x02, "SH", "ab")  # too short to keep
    ds.save_as(path, implicit_vr=True, little_endian=True)
    ingest(tmp_path, tmp_path / "out")
    ids = {(r["tag"], r["value"]) for r in _read(tmp_path / "out" / "identifiers.csv")}
    assert ("OtherPatientIDsSequence[0].PatientID", "ALT-7781") in ids
    assert ("OtherPatientIDsSequence[0].IssuerOfPatientID", "OTHERHOSP") in ids
    assert ("AdditionalPatientHistory", "seen by Dr Who at home") in ids
    assert ("(0011,1001)", "Private Secret Value") in ids  # read back as UN (implicit VR)
    assert not any(v == "ab" for _, v in ids)
    assert not any(t == "(0011,0010)" for t, _ in ids)
    row = _read(tmp_path / "out" / "manifest.csv")[0]
    assert (row["sex"], row["age"], row["label"]) == ("F", "0.5", "cls")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("age,birth,study,expected", [
    ("054Y", "", "", "54"), ("006M", "", "", "0.5"), ("013W", "", "", "0.25"), ("030D", "", "", "0.08"),
    ("", "19700615", "20240614", "53"), ("", "19700615", "20240615", "54"), ("", "garbage", "20240615", ""),
    ("", "", "", ""),
])
def test_age_in_years(age, birth, study, expected):
    ds = Dataset()
    if age:
        ds.PatientAge = age
    if birth:
        ds.PatientBirthDate = birth
    if study:
        ds.StudyDate = study
    assert age_years(ds) == expected


def test_own_meta_reader_gives_what_dcmread_gives(monkeypatch):
    """The File Meta reader ingest uses for native little-endian files: on every file of pydicom's
    test files and deid-data, the manifest row, identifiers and quarantine reason are those of
    ``pydicom.dcmread``; and it does take the files it is for."""
    import deid_data
    from pydicom.data import get_testdata_file

    from haven import sources
    from haven.sources import dicom

    files = [p for p in sorted(Path(get_testdata_file("CT_small.dcm")).parent.rglob("*")) if p.is_file()]
    files += sorted((Path(deid_data.__file__).parent / "data").rglob("*.dcm"))

    def results():
        out = []
        with sources.quiet():
            for p in files:
                try:
                    out.append(sources.read_header(p, p.name, True))
                except Exception as e:  # quarantined (or a reason), compared as text
                    out.append((type(e).__name__,
                                sources.reason(e, p) if not isinstance(e, sources.Quarantine) else str(e)))
        return out

    def unusual(*_a, **_k):  # the byte-level parse is compared with pydicom in tests/test_fastheader.py
        raise dicom.Unusual("off")

    monkeypatch.setattr(dicom, "_parsed_header", unusual)
    taken = []
    real = dicom._read_native

    def counted(fh):
        ds = real(fh)
        taken.append(ds is not None)
        return ds

    monkeypatch.setattr(dicom, "_read_native", counted)
    own = results()
    monkeypatch.setattr(dicom, "_read_native", lambda fh: None)
    assert own == results()
    assert sum(taken) > 80
    assert sum(isinstance(r[0], dict) for r in own) > 100  # accepted files, compared field by field


def test_quarantine_reason_hides_a_quoted_path_the_same_way_in_every_process(tmp_path):
    # the path's spellings were replaced in a set's order, which changes with string hashing:
    # some runs wrote <file>, others '<file>' (seen on the digits demo's corrupt PNG)
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from haven.sources.base import reason; p = Path(sys.argv[1]); "
            "print(reason(OSError(f'cannot identify image file {str(p)!r}'), p))")
    bad = tmp_path / "bad.png"
    seen = {subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in range(8)}
    assert seen == {"OSError: cannot identify image file <file>"}


# ---------------------------------------------------------------------------------------------
# pixel data checked by its structure (sources/dicompixels.py), not by decoding every image


def _jpeg_frame(size: int = 16) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray((np.arange(size * size) % 251).astype(np.uint8).reshape(size, size)).save(buf, format="JPEG")
    return buf.getvalue()


def _encapsulated(fragments: list[bytes], bot: bytes = b"") -> bytes:
    out = b"\xfe\xff\x00\xe0" + len(bot).to_bytes(4, "little") + bot
    for f in fragments:
        f += b"\x00" * (len(f) & 1)
        out += b"\xfe\xff\x00\xe0" + len(f).to_bytes(4, "little") + f
    return out


def _jpeg_ct(path: Path, pixel_data: bytes, rows: int = 16, cols: int = 16) -> Path:
    """A JPEG Baseline CT file (8-bit grey) with the given encapsulated pixel data."""
    from pydicom.uid import JPEGBaseline8Bit

    _ct(path, Rows=rows, Columns=cols)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def _pixel_reasons(tmp_path: Path, files: dict[str, bytes | tuple]) -> dict[str, str]:
    """Ingest one JPEG file per entry (pixel data, or (pixel data, rows, cols)): path -> reason, "OK"."""
    for name, spec in files.items():
        data, rows, cols = spec if isinstance(spec, tuple) else (spec, 16, 16)
        _jpeg_ct(tmp_path / "src" / "c" / f"{name}.dcm", data, rows, cols)
    ingest(tmp_path / "src", tmp_path / "out")
    got = {r["path"]: "OK" for r in _read(tmp_path / "out" / "manifest.csv")}
    got.update({r["path"]: r["reason"] for r in _read(tmp_path / "out" / "quarantine.csv")})
    return {Path(p).stem: r for p, r in got.items()}


def test_good_jpeg_is_accepted_without_decoding(tmp_path, monkeypatch):
    from pydicom.dataset import Dataset as DS

    frame = _jpeg_frame()
    monkeypatch.setattr(DS, "pixel_array", property(lambda self: pytest.fail("ingest decoded the pixels")))
    got = _pixel_reasons(tmp_path, {"plain": _encapsulated([frame]),
                                    "split": _encapsulated([frame[:100], frame[100:]]),
                                    "bot": _encapsulated([frame], bot=b"\x00\x00\x00\x00")})
    assert got == {"plain": "OK", "split": "OK", "bot": "OK"}


def test_truncated_jpeg_fragment_is_quarantined(tmp_path):
    # today's decoder (libjpeg) decodes a cut-off baseline stream without an error, so the old
    # decode-everything check accepted this file; the missing EOI marker tells
    frame = _jpeg_frame()
    cut = frame[: len(frame) // 2 * 2 - 40]
    got = _pixel_reasons(tmp_path, {"cut": _encapsulated([cut])})
    assert got["cut"] == ("pixel data cannot be decoded: the JPEG stream has no end marker (truncated fragment)")


def test_fragment_longer_than_the_data_is_quarantined(tmp_path):
    frame = _jpeg_frame()
    data = bytearray(_encapsulated([frame]))
    data[12:16] = (len(frame) + 1000).to_bytes(4, "little")  # the item claims more than the file holds
    got = _pixel_reasons(tmp_path, {"long": bytes(data), "junk": _encapsulated([frame]) + b"\x01\x02\x03\x04"})
    assert got["long"].startswith("pixel data cannot be decoded: a fragment of") and "(truncated)" in got["long"]
    assert got["junk"] == "pixel data cannot be decoded: 4 stray bytes after the last fragment (truncated?)"


def test_jpeg_frame_header_must_match_the_image_description(tmp_path):
    # the old check decoded these and failed on the array's shape (caught, with a numpy message)
    frame = _jpeg_frame()
    got = _pixel_reasons(tmp_path, {"rows": (_encapsulated([frame]), 15, 16), "cols": (_encapsulated([frame]), 16, 17),
                                    "nosof": _encapsulated([b"\xff\xd8\xff\xd9"]),
                                    "notjpeg": _encapsulated([b"\x00" * 64 + b"\xff\xd9"])})
    assert got["rows"] == ("pixel data does not match the image description: the JPEG stream has rows x columns "
                           "16 x 16, the header 15 x 16")
    assert "16 x 16, the header 16 x 17" in got["cols"]
    assert got["nosof"].endswith("has no readable frame header (SOF)")
    assert got["notjpeg"].endswith("not a JPEG stream (no SOI marker)")


def test_multiframe_structure_against_number_of_frames(tmp_path):
    frame = _jpeg_frame()
    table = b"".join(o.to_bytes(4, "little") for o in (0, len(frame) + len(frame) % 2 + 8))
    cases = {"ok": _encapsulated([frame, frame], bot=table), "short": _encapsulated([frame]),
             "badtable": _encapsulated([frame, frame], bot=b"\x00\x00\x00\x00\x05\x00\x00\x00"),
             "tablecount": _encapsulated([frame, frame], bot=b"\x00\x00\x00\x00")}
    for name, data in cases.items():
        path = _jpeg_ct(tmp_path / "src" / "c" / f"{name}.dcm", data)
        ds = pydicom.dcmread(path)
        ds.NumberOfFrames = 2
        ds.save_as(path)
    ingest(tmp_path / "src", tmp_path / "out")
    q = {Path(r["path"]).stem: r["reason"] for r in _read(tmp_path / "out" / "quarantine.csv")}
    assert "ok" not in q
    assert q["short"] == "pixel data cannot be decoded: 1 fragments for 2 frames (truncated?)"
    assert "does not point at the start of each frame" in q["badtable"]
    assert q["tablecount"] == "pixel data cannot be decoded: the Basic Offset Table lists 1 frames for 2 in the header"


def test_native_length_against_the_image_description(tmp_path):
    # a short native image was already caught (by length, as today: tests above); an odd-length
    # image with its pad byte, and excess padding (which pydicom drops when decoding), are accepted
    src = tmp_path / "c"
    _ct(src / "ok.dcm")
    ds = pydicom.dcmread(_ct(src / "odd.dcm", Rows=3, Columns=3))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(range(9)) + b"\x00"
    ds.save_as(src / "odd.dcm")
    for name, change in (("padded", lambda b: b + b"\x00" * 64), ("short", lambda b: b[:-2])):
        ds = pydicom.dcmread(src / "ok.dcm")
        ds.SOPInstanceUID = generate_uid()  # not a duplicate of ok.dcm
        ds.PixelData = change(ds.PixelData)
        ds.save_as(src / f"{name}.dcm")
    ingest(tmp_path, tmp_path / "out")
    assert {r["path"] for r in _read(tmp_path / "out" / "manifest.csv")} == {"c/ok.dcm", "c/odd.dcm", "c/padded.dcm"}
    q = {r["path"]: r["reason"] for r in _read(tmp_path / "out" / "quarantine.csv")}
    assert q == {"c/short.dcm": "pixel data cannot be decoded: 126 bytes for an image of 128 bytes (truncated?)"}


def test_damage_inside_the_jpeg_stream_stops_preprocess_naming_the_file(tmp_path):
    # a misplaced marker inside the entropy-coded data: the structure is sound, only a decoder
    # sees it, so ingest accepts the file and preprocess stops on it with its name
    from haven.learn.preprocess import DecodeError, load_batch

    frame = bytearray(_jpeg_frame(64))
    scan = frame.index(b"\xff\xda")
    frame[scan + 40:scan + 42] = b"\xff\xc4"
    got = _pixel_reasons(tmp_path, {"damaged": (_encapsulated([bytes(frame)]), 64, 64)})
    assert got == {"damaged": "OK"}
    path = tmp_path / "src" / "c" / "damaged.dcm"
    with pytest.raises(DecodeError, match="damaged.dcm cannot be decoded"):
        load_batch([path], ["dicom"], {"mode": "gray", "windows": [], "size": 8, "slab": 0})
