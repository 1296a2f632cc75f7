"""Real hospital exports (issue 17): file names that are not UTF-8, unlabeled DICOM folders and
de-identification-only projects, and `haven deid SRC DST`, the one-liner - all through the CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image

from haven.io import read_rows
from test_bad_input import _ct, _ingest_files, _preprocess_files, haven

CAFE = b"caf\xe9_scan.dcm"  # Latin-1, as a Windows share or an old archive writes it: not UTF-8
KEY = "0123456789abcdef0123456789abcdef"


def _name(raw: bytes) -> str:
    """The str Python gives a file name of these bytes (surrogate-escaped when not UTF-8)."""
    return os.fsdecode(raw)


def _anonymize_args(src: Path, ingest: Path, anon: Path, params: str) -> list[str]:
    return ["anonymize", str(src), "--ingest-manifest", str(ingest / "manifest.csv"), "--data", str(anon / "data"),
            "--manifest", str(anon / "manifest.csv"), "--log", str(anon / "anonymization.log.csv"),
            "--quarantine", str(anon / "quarantine.csv"), "--params", params]


def _audit_args(ingest: Path, anon: Path) -> list[str]:
    return ["audit", "--data", str(anon / "data"), "--manifest", str(anon / "manifest.csv"),
            "--log", str(anon / "anonymization.log.csv"), "--identifiers", str(ingest / "identifiers.csv"),
            "--ingest-manifest", str(ingest / "manifest.csv"), "--result", str(anon / "audit.json")]


def _key_params(tmp_path: Path) -> str:
    (tmp_path / "k").write_text(KEY)
    return json.dumps({"key_file": str(tmp_path / "k"), "key_env": None, "demo_key": False})


# ---------------------------------------------------------------------------------------------
# 1. one file name must not stop a cohort


@pytest.fixture()
def latin1(tmp_path):
    """A class folder with a DICOM and an image whose names are Latin-1 bytes, a good DICOM, and a
    class folder whose own name is not UTF-8."""
    src = tmp_path / "src"
    _ct(src / "c" / "good.dcm", "1.2.3.4.1")
    _ct(Path(os.fsdecode(os.fsencode(src / "c") + b"/" + CAFE)), "1.2.3.4.2", patient="PAT2", accession="ACC2")
    Image.fromarray(np.full((6, 6), 9, np.uint8)).save(os.fsencode(src / "c") + b"/r\xe9sum\xe9.png", format="PNG")
    _ct(Path(os.fsdecode(os.fsencode(src) + b"/d\xe9j\xe0")) / "x.dcm", "1.2.3.4.3", patient="PAT3", accession="ACC3")
    return src


def test_a_file_name_that_is_not_utf8_is_ingested_anonymized_and_audited(latin1, tmp_path):
    shards = [tmp_path / "ingest" / "shards" / str(i) for i in range(2)]
    for i, out in enumerate(shards):  # two shard jobs: the shard hash of the name, then the merge
        run = haven("ingest", str(latin1), *_ingest_files(out), "--shard", f"{i}/2")
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    ingest = tmp_path / "ingest"
    run = haven("merge", "ingest", *_ingest_files(ingest), "--shard-manifests", *(str(s / "manifest.csv") for s in shards),
                "--shard-identifiers", *(str(s / "identifiers.csv") for s in shards),
                "--shard-quarantines", *(str(s / "quarantine.csv") for s in shards))
    assert run.returncode == 0, run.stderr
    # the PHI-zone manifest keeps the name as its bytes, and reads back as the name Python gives the file
    assert b"c/" + CAFE in (ingest / "manifest.csv").read_bytes()
    paths = [r["path"] for r in read_rows(ingest / "manifest.csv")]
    assert paths == ["c/" + _name(CAFE), "c/good.dcm", "c/" + _name(b"r\xe9sum\xe9.png")]
    # a class folder whose name is not UTF-8 would put its bytes in the safe haven's label column
    q = list(read_rows(ingest / "quarantine.csv"))
    assert [(r["path"], r["reason"]) for r in q] == [
        (_name(b"d\xe9j\xe0/x.dcm"), "no label: the class folder's name is not valid UTF-8: rename the folder")]

    anon = tmp_path / "anon"
    run = haven(*_anonymize_args(latin1, ingest, anon, _key_params(tmp_path)))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert json.loads(run.stdout)["anonymized"] == 3  # the file opened again from its name in the table
    assert (anon / "quarantine.csv").read_text() == "input_index,reason\n"
    outputs = [p for p in (anon / "data").rglob("*") if p.is_file()]
    assert len(outputs) == 3 and all(p.as_posix().isascii() for p in outputs)  # named from UIDs / keyed hashes
    (anon / "manifest.csv").read_bytes().decode("ascii")  # the safe haven's tables are plain text
    (anon / "anonymization.log.csv").read_bytes().decode("ascii")

    run = haven(*_audit_args(ingest, anon))
    assert run.returncode == 0 and "audit passed: 3 file(s)" in run.stdout, run.stdout + run.stderr


def test_the_audit_reads_a_name_that_is_not_utf8_in_its_data_folder(latin1, tmp_path):
    """A stray file under data/ with such a name (not haven's: its outputs never are) is scanned, not a crash."""
    ingest, anon = tmp_path / "ingest", tmp_path / "anon"
    assert haven("ingest", str(latin1), *_ingest_files(ingest)).returncode == 0
    assert haven(*_anonymize_args(latin1, ingest, anon, _key_params(tmp_path))).returncode == 0
    stray = Path(os.fsdecode(os.fsencode(anon / "data") + b"/PAT2/" + CAFE))
    stray.parent.mkdir()
    stray.write_bytes(b"x")
    run = haven(*_audit_args(ingest, anon))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "file name" in run.stderr and "audit FAILED" in run.stderr


# ---------------------------------------------------------------------------------------------
# 2. unlabeled data can be de-identified; training says it needs labels


@pytest.fixture()
def flat(tmp_path):
    """A folder of DICOM files with no class folders and no label table."""
    src = tmp_path / "flat"
    for i in range(4):
        _ct(src / f"{i}.dcm", f"1.2.3.9.{i}", patient=f"PAT{i}", accession=f"ACC{i}")
    return src


def test_an_unlabeled_dicom_folder_is_deidentified_and_preprocess_says_what_is_missing(flat, tmp_path):
    ingest, anon = tmp_path / "ingest", tmp_path / "anon"
    run = haven("ingest", str(flat), *_ingest_files(ingest), "--params", json.dumps({"until": "audit"}))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["accepted"] == 4
    assert {r["label"] for r in read_rows(ingest / "manifest.csv")} == {""}
    run = haven(*_anonymize_args(flat, ingest, anon, _key_params(tmp_path)))
    assert run.returncode == 0 and json.loads(run.stdout)["anonymized"] == 4, run.stderr
    run = haven(*_audit_args(ingest, anon))
    assert run.returncode == 0 and "audit passed: 4 file(s)" in run.stdout, run.stderr

    run = haven("preprocess", *_preprocess_files(anon, tmp_path / "pre"), "--params",
                json.dumps({"preprocess": {"size": 8, "mode": "ct"}}))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    error = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and str(anon / "manifest.csv") in error[0]
    assert "4 of 4 files have no label" in error[0] and "`labels`" in error[0] and "until: audit" in error[0]


def test_a_project_that_trains_still_quarantines_unlabeled_files_and_says_how_to_deidentify_them(flat, tmp_path):
    run = haven("ingest", str(flat), *_ingest_files(tmp_path / "ingest"))
    assert run.returncode == 0 and json.loads(run.stdout)["accepted"] == 0
    assert {r["reason"] for r in read_rows(tmp_path / "ingest" / "quarantine.csv")} == {
        "no label: the file is not in a class folder and no labels table was given"}
    assert "until: audit" in run.stderr  # the way out, once, in the log


def _dry_run(root: Path, work: Path, config: dict) -> str:
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(work),
                          "-n", "-p"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_a_deidentification_only_project_schedules_nothing_past_the_audit(root, flat, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    deid = {"source": str(flat), "until": "audit"}
    out = _dry_run(root, work, {"key_file": str(tmp_path / "k"), "projects": {"export": deid}})
    jobs = set(re.findall(r"^(?:local)?rule (\w+):", out, re.M))
    assert jobs == {"ingest_shard", "ingest", "anonymize_shard", "anonymize", "audit", "all"}, jobs
    assert "results/export/anonymize/audit.json" in out

    # beside a project that trains: that one runs to its report and compare; the export still stops
    both = yaml.safe_load((root / "config.yaml").read_text())
    both["projects"] = {"digits": both["projects"]["digits"], "export": deid}
    out = _dry_run(root, work, both)
    assert "results/compare.csv" in out and "results/digits/report/index.html" in out
    assert not [line for line in out.splitlines() if "results/export/" in line and "/anonymize/" not in line
                and "/ingest/" not in line and "/logs/" not in line and "/benchmarks/" not in line]


# ---------------------------------------------------------------------------------------------
# 3. haven deid SRC DST


def _export(tmp_path: Path) -> Path:
    """pydicom's and deid-data's real test files, and a bad file, in one folder."""
    import deid_data
    from pydicom.data import get_testdata_file

    src = tmp_path / "export"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    humans = Path(deid_data.__file__).parent / "data" / "humans"
    shutil.copy(humans / "ctbrain1.dcm", src / "ctbrain1.dcm")
    (src / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")  # a DICOM cut after its preamble
    return src


def _identifiers(phi: Path) -> set[str]:
    with open(phi / "identifiers.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        values = {r["value"] for r in csv.DictReader(fh)}
    return {v for v in values if len(v) >= 4 and not v.replace(".", "").isdigit()}


def test_haven_deid_deidentifies_an_export_in_one_line(tmp_path):
    src, dst = _export(tmp_path), tmp_path / "out" / "deid"
    (tmp_path / "k").write_text(KEY)
    run = haven("deid", str(src), str(dst), "--key-file", str(tmp_path / "k"), env={"HAVEN_KEY": ""})
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert "5 file(s) in, 4 de-identified, 1 quarantined" in run.stdout
    assert "audit passed: 0 finding(s)" in run.stdout and "files/s" in run.stdout
    phi = tmp_path / "out" / ".haven-deid-phi"
    assert str(phi) in run.stdout
    # DST: the safe side only
    assert sorted(p.name for p in dst.iterdir()) == ["anonymization.log.csv", "audit.json", "data", "manifest.csv",
                                                      "quarantine.csv"]
    assert json.loads((dst / "audit.json").read_text())["passed"] is True
    assert len([p for p in (dst / "data").rglob("*.dcm")]) == 4
    assert "broken.dcm" not in (dst / "quarantine.csv").read_text()
    # the PHI zone: private, outside DST, with the bad file's reason
    assert stat.S_IMODE(phi.stat().st_mode) == 0o700
    assert sorted(p.name for p in phi.iterdir()) == ["identifiers.csv", "manifest.csv", "quarantine.csv"]
    assert [r["path"] for r in read_rows(phi / "quarantine.csv")] == ["broken.dcm"]
    # no original identifier in what it printed or in DST
    ids = _identifiers(phi)
    assert ids and not [v for v in ids if v in run.stdout or v in run.stderr]
    for f in dst.rglob("*"):
        if f.is_file():
            ds = pydicom.dcmread(f) if f.suffix == ".dcm" else None
            assert ds is None or not str(ds.get("PatientName", "")) or str(ds.PatientName) not in ids


def test_haven_deid_options_and_failures(tmp_path):
    src = tmp_path / "src"
    _ct(src / "a.dcm", "1.2.3.7.1")
    env = {"HAVEN_KEY": KEY}
    run = haven("deid", str(src), str(tmp_path / "uids"), "--retain-uids", "--json", env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    out = next(Path(summary["data"]).rglob("*.dcm"))
    assert pydicom.dcmread(out).SOPInstanceUID == "1.2.3.7.1"  # the flag reached the profile

    # a folder named after the patient: the label it gives leaks the id, the gate catches it, exit 1
    leak = tmp_path / "leak"
    _ct(leak / "PAT1" / "a.dcm", "1.2.3.7.2", patient="PAT1")
    run = haven("deid", str(leak), str(tmp_path / "leak-out"), env=env)
    assert run.returncode == 1 and "audit FAILED" in run.stdout, run.stdout + run.stderr
    assert (tmp_path / "leak-out" / "audit.failed.json").is_file()
    assert not (tmp_path / "leak-out" / "audit.json").exists() and "PAT1" not in run.stdout

    run = haven("deid", str(src), str(tmp_path / "nokey"), env={"HAVEN_KEY": ""})
    assert run.returncode == 2 and "--key-file" in run.stderr and "haven keygen" in run.stderr
    run = haven("deid", str(src), str(src / "inside"), env=env)
    assert run.returncode == 2 and "outside the export" in run.stderr
    run = haven("deid", str(src), str(tmp_path / "bad"), "--pixels", "all", "--age-band-width", "0", env=env)
    assert run.returncode == 2 and "age_band_width" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.integration
def test_snakemake_deidentifies_an_unlabeled_export_with_a_latin1_name_and_stops_at_the_audit(root, flat, tmp_path):
    _ct(Path(os.fsdecode(os.fsencode(flat) + b"/" + CAFE)), "1.2.3.9.9", patient="PAT9", accession="ACC9")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "k").write_text(KEY)
    config = {"key_file": str(tmp_path / "k"), "demo_key": False, "projects": {"export": {
        "source": str(flat), "until": "audit", "shards": 2}}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(work),
                          "--cores", "2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = work / "results" / "export"
    assert json.loads((results / "anonymize" / "audit.json").read_text())["passed"] is True
    assert len(list(read_rows(results / "anonymize" / "manifest.csv"))) == 5
    assert sorted(p.name for p in results.iterdir()) == ["anonymize", "benchmarks", "ingest", "logs"]


def _dates_one_shift_apart(src: Path) -> Path:
    """Two studies of one patient whose dates lie exactly the patient's day shift apart: the first
    study's shifted date is the second's original date (a coincidence, not a leak)."""
    import datetime as dt

    from haven.keys import day_shift

    first = dt.date(2020, 1, 15)
    second = first + dt.timedelta(days=day_shift(KEY.encode(), "PATD"))
    for sop, accession, day in (("1.2.3.8.1", "ACC8", first), ("1.2.3.8.2", "ACC9", second)):
        path = _ct(src / f"{accession}.dcm", sop, patient="PATD", accession=accession)
        ds = pydicom.dcmread(path)
        ds.StudyDate = day.strftime("%Y%m%d")
        ds.save_as(path, enforce_file_format=True)
    return src


def test_a_date_shifted_onto_another_of_the_patients_dates_passes_an_audit_that_has_the_key(tmp_path):
    src = _dates_one_shift_apart(tmp_path / "src")
    # haven deid holds the key it anonymized with, so its audit can explain the coincidence
    run = haven("deid", str(src), str(tmp_path / "deid"), env={"HAVEN_KEY": KEY})
    assert run.returncode == 0 and "audit passed: 0 finding(s)" in run.stdout, run.stdout + run.stderr
    # the pipeline's audit finds the key where the stage settings say (the rule passes them)
    ingest, anon = tmp_path / "ingest", tmp_path / "anon"
    run = haven("ingest", str(src), *_ingest_files(ingest), "--params", json.dumps({"until": "audit"}))
    assert run.returncode == 0, run.stderr
    run = haven(*_anonymize_args(src, ingest, anon, _key_params(tmp_path)), env={"HAVEN_KEY": ""})
    assert run.returncode == 0, run.stderr
    run = haven(*_audit_args(ingest, anon), env={"HAVEN_KEY": ""})
    assert run.returncode == 1 and "StudyDate" in run.stderr  # without the key: fails closed on the coincidence
    run = haven(*_audit_args(ingest, anon), "--params", _key_params(tmp_path), env={"HAVEN_KEY": ""})
    assert run.returncode == 0 and "audit passed: 2 file(s)" in run.stdout, run.stdout + run.stderr
