"""Bad input: every data problem gets a message naming the file or key and the fix, never a
traceback, and loses nothing already done; no input can make the pipeline write outside its folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

HAVEN = [sys.executable, "-m", "haven.cli"]


def haven(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*HAVEN, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _ct(path: Path, sop: str, patient: str = "PAT1", accession: str = "ACC1", study: str | None = None) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop, "CT"
    ds.StudyInstanceUID = study or f"{sop}.1"
    ds.SeriesInstanceUID = f"{sop}.2"
    ds.PatientID, ds.AccessionNumber, ds.PatientName = patient, accession, "DOE^JOHN"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def junk(tmp_path):
    """A source folder with one good file and one of each kind of bad input."""
    src = tmp_path / "src" / "c"  # one class folder (labels from folder names)
    good = _ct(src / "good.dcm", "1.2.3.4.1")
    (src / "empty.dcm").write_bytes(b"")
    (src / "notes.dcm").write_text("not a DICOM file at all\n")
    raw = good.read_bytes()
    (src / "truncated.dcm").write_bytes(raw[: len(raw) - 40])
    _ct(src / "photo.png", "1.2.3.4.3")  # a DICOM with an image's extension
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(src / "scan.dcm", format="PNG")  # and the reverse
    (src / "folder.dcm").mkdir()  # a directory where a file is expected
    (src / "folder.dcm" / "x.txt").write_text("x")
    locked = _ct(src / "locked.dcm", "1.2.3.4.2")
    locked.chmod(0)
    import zipfile  # an archive holding a DICOM (deid-data's CINE loops come like this)

    with zipfile.ZipFile(src / "cine.zip", "w") as z:
        z.writestr("DOE_JOHN/cine.dcm", raw)
    src = src.parent
    return src


def _ingest_files(out: Path) -> list[str]:
    """`haven ingest` arguments writing its three tables into the folder ``out``."""
    return ["--manifest", str(out / "manifest.csv"), "--identifiers", str(out / "identifiers.csv"),
            "--quarantine", str(out / "quarantine.csv")]


def _preprocess_files(anon: Path, pre: Path) -> list[str]:
    """`haven preprocess` arguments reading the anonymize folder ``anon``, writing into ``pre``."""
    return ["--manifest", str(anon / "manifest.csv"), "--audit", str(anon / "audit.json"), "--data", str(anon / "data"),
            *(a for split in ("train", "val", "test") for a in (f"--{split}", str(pre / f"{split}.zarr"))),
            "--splits", str(pre / "splits.csv"), "--stats", str(pre / "stats.json")]


def test_bad_files_are_quarantined_with_reasons_and_no_traceback(junk, tmp_path):
    run = haven("ingest", str(junk), *_ingest_files(tmp_path / "out"))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv").set_index("path")["reason"].to_dict()
    m = pd.read_csv(tmp_path / "out" / "manifest.csv")
    # a DICOM under another extension is still a DICOM; root reads the locked file
    assert set(m["path"]) == {"c/good.dcm", "c/photo.png", "c/locked.dcm"}
    assert q["c/empty.dcm"] == "empty file (0 bytes)"
    assert "not DICOM" in q["c/notes.dcm"]
    assert "truncated" in q["c/truncated.dcm"]
    assert q["c/scan.dcm"] == "a PNG image with a .dcm extension: rename it to .png to use it"
    assert "not DICOM" in q["c/folder.dcm/x.txt"]
    assert q["c/cine.zip"].startswith("an archive") and "unpack it into the source folder" in q["c/cine.zip"]
    assert len(q) == 6
    # nothing was unpacked: no member name anywhere under the source or the output
    assert not [p for p in tmp_path.rglob("*") if "DOE_JOHN" in p.name]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to drop root")
def test_unreadable_file_is_quarantined_for_a_user_who_cannot_read_it(junk, tmp_path):
    """As an ordinary user (root reads anything): a file without read permission is quarantined."""
    out = tmp_path / "user-out"
    out.mkdir()
    out.chmod(0o777)
    for d in [tmp_path, *tmp_path.parents]:
        if d == Path("/"):
            break
        d.chmod(d.stat().st_mode | 0o005)  # the user may walk to the source
    for p in [junk, *junk.rglob("*")]:
        if p.name != "locked.dcm":
            p.chmod(p.stat().st_mode | (0o005 if p.is_dir() else 0o004))
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *HAVEN, "ingest",
                          str(junk), *_ingest_files(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HOME": str(out)})
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    q = pd.read_csv(out / "quarantine.csv").set_index("path")["reason"].to_dict()
    assert "PermissionError" in q["c/locked.dcm"]


def test_label_table_with_missing_and_unknown_ids(tmp_path):
    src = tmp_path / "src"
    _ct(src / "a.dcm", "1.2.3.5.1", accession="A1")
    _ct(src / "b.dcm", "1.2.3.5.2", accession="A2", patient="PAT2")
    table = tmp_path / "labels.csv"
    table.write_text("accession,label\nA1,bleed\nA9,normal\nA8,normal\n")  # A2 missing; A8, A9 match no file
    params = json.dumps({"labels": str(table), "label_key": "accession", "label_column": "label"})
    shard = tmp_path / "ingest" / "shards" / "0"
    run = haven("ingest", str(src), *_ingest_files(shard), "--params", params)
    assert run.returncode == 0, run.stderr
    q = pd.read_csv(tmp_path / "ingest" / "shards" / "0" / "quarantine.csv")
    assert q.to_dict("records") == [{"path": "b.dcm", "reason": "no label for this file in labels.csv"}]
    merged = haven("merge", "ingest", *_ingest_files(tmp_path / "ingest"),
                   "--shard-manifests", str(shard / "manifest.csv"), "--shard-identifiers", str(shard / "identifiers.csv"),
                   "--shard-quarantines", str(shard / "quarantine.csv"), "--params", params)
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["unmatched_label_rows"] == 2
    assert "labels.csv: 2 of its 3 rows match no accepted file by accession" in merged.stderr


def _anonymize_files(tmp_path) -> list[str]:
    """`haven anonymize` arguments for an ingest that never ran (tmp_path/no-ingest) into tmp_path/anon."""
    anon = tmp_path / "anon"
    return ["--ingest-manifest", str(tmp_path / "no-ingest" / "manifest.csv"), "--data", str(anon / "data"),
            "--manifest", str(anon / "manifest.csv"), "--log", str(anon / "anonymization.log.csv"),
            "--quarantine", str(anon / "quarantine.csv")]


def test_stage_errors_name_the_file_and_the_fix_without_a_traceback(tmp_path):
    # a labels file that is not there
    run = haven("ingest", str(tmp_path), *_ingest_files(tmp_path / "out"), "--params",
                json.dumps({"labels": str(tmp_path / "nope.csv"), "label_key": "accession"}))
    assert run.returncode == 2 and "nope.csv not found" in run.stderr and "Traceback" not in run.stderr
    # a source that is not a folder
    run = haven("ingest", str(tmp_path / "missing"), *_ingest_files(tmp_path / "out"))
    assert run.returncode == 2 and "is not a folder" in run.stderr and "Traceback" not in run.stderr
    # anonymize before ingest
    run = haven("anonymize", str(tmp_path), *_anonymize_files(tmp_path), "--params",
                json.dumps({"key_env": "HAVEN_TEST_KEY"}), env={"HAVEN_TEST_KEY": "k" * 32})
    assert run.returncode == 2 and "run `haven ingest` first" in run.stderr and "Traceback" not in run.stderr
    # no key at all
    run = haven("anonymize", str(tmp_path), *_anonymize_files(tmp_path), "--params",
                json.dumps({"key_file": str(tmp_path / "no.key"), "key_env": "HAVEN_UNSET_KEY"}))
    assert run.returncode == 2 and "Traceback" not in run.stderr and "key" in run.stderr.lower()
    # preprocess of data that did not pass the audit
    (tmp_path / "anon").mkdir(exist_ok=True)
    (tmp_path / "anon" / "manifest.csv").write_text("file,kind,patient,label\n")
    run = haven("preprocess", *_preprocess_files(tmp_path / "anon", tmp_path / "pre"), "--params",
                json.dumps({"preprocess": {"size": 8, "mode": "gray"}}))
    assert run.returncode != 0 and "audit" in run.stderr and "Traceback" not in run.stderr


def test_undecodable_audited_file_stops_preprocess_with_its_name(tmp_path):
    anon = tmp_path / "anon"
    (anon / "data").mkdir(parents=True)
    rows = []
    for i in range(12):
        name = f"{i}.png"
        Image.fromarray(np.full((6, 6), 20 * i, np.uint8)).save(anon / "data" / name)
        rows.append({"file": name, "kind": "image", "patient": f"P{i}", "label": "ab"[i % 2], "sex": "",
                     "age_band": "", "site": "", "study": "", "series": "", "modality": ""})
    (anon / "data" / "5.png").write_bytes(b"\x89PNG garbage")
    pd.DataFrame(rows).to_csv(anon / "manifest.csv", index=False)
    (anon / "audit.json").write_text(json.dumps({"passed": True}))
    params = {"preprocess": {"size": 8, "mode": "gray", "windows": [], "split": {"val": 0.2, "test": 0.2},
                             "chunk": 4, "workers": 1}}
    run = haven("preprocess", *_preprocess_files(anon, tmp_path / "pre"), "--params", json.dumps(params))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "5.png cannot be decoded" in run.stderr and "re-run the pipeline" in run.stderr
    assert "Traceback" not in run.stderr
    assert (anon / "manifest.csv").is_file()  # nothing already done is lost


def test_uids_and_labels_cannot_steer_outputs_outside_the_results(tmp_path):
    """Output names come from keyed UIDs and pseudonyms, never from header values or labels."""
    from deidrun import anonymize_into
    from haven.ingest import ingest

    src = tmp_path / "src"
    _ct(src / "a.dcm", "1.2.3.6.1", study="../../../../escaped", patient="../../../../escaped-patient")
    table = tmp_path / "labels.csv"
    table.write_text("accession,label\nACC1,../../../../escaped-label\n")
    ingest(src, tmp_path / "ingest", labels=table, label_key="accession")
    out = tmp_path / "results" / "anonymize"
    summary = anonymize_into(src, tmp_path / "ingest", out, b"k" * 32)
    assert summary["anonymized"] == 1
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if "escaped" in p.name]
    (dcm,) = [p for p in (out / "data").rglob("*.dcm")]
    assert dcm.resolve().is_relative_to(out.resolve())
    assert "escaped" not in str(dcm) and pydicom.dcmread(dcm).StudyInstanceUID.startswith("2.25.")
