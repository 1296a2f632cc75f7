"""The audit's precision on real files and its way forward: a reviewer accepts a finding that is
not PHI (``haven audit --review``, ``audit.accept``), by keyed hash and place, never by value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml

from deidrun import anonymize_into, audit_of
from haven import keys
from haven.config import ConfigError, validate
from haven.deid.accept import REASON_TODO, check_entries, value_hash
from haven.deid.audit import gate
from haven.deid.identifiers import Identifiers
from haven.report.findings import accepted_rows
from test_anonymize import KEY, OTHER_KEY, STATION, _dicom


def _rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# precision: a coded term is not another patient's demographic category


def test_coded_term_is_not_another_patients_category():
    ids = Identifiers([("A", "BranchOfService", "ABDOMEN"), ("A", "PatientName", "CHEST^JOHN"),
                       ("A", "RegionOfResidence", "PELVIS"), ("C", "StationName", "PELVIS")])
    assert ids.match("ABDOMEN", "CS", "B", public=True) == set()  # B's BodyPartExamined
    assert ids.match("HEAD\\ABDOMEN", "CS", "B", public=True) == set()
    # the same value is still found wherever it may be the identifier it was
    assert ids.match("ABDOMEN", "CS", "A", public=True) == {"BranchOfService"}  # A's own
    assert ids.match("ABDOMEN", "CS", None, public=True) == {"BranchOfService"}  # no known patient
    assert ids.match("ABDOMEN", "LO", "B", public=True) == {"BranchOfService"}  # not a coded element
    assert ids.match("ABDOMEN", "CS", "B", public=False) == {"BranchOfService"}  # private
    assert ids.match("Abdomen", "CS", "B", public=True) == {"BranchOfService"}  # no Code String
    assert ids.match("ABDOMENX", "CS", "B", public=True) == {"BranchOfService"}  # not the whole value
    assert ids.match("ABDOMEN") == {"BranchOfService"}  # a CSV cell
    # names, ids, places: never exempt, even in a CS element of another patient
    assert ids.match("CHEST JOHN", "CS", "B", public=True) == {"PatientName"}
    assert ids.match("PELVIS", "CS", "B", public=True) == {"RegionOfResidence", "StationName"}


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    """pydicom's test files and deid-data together, every file, through ingest and anonymize."""
    import deid_data
    from pydicom.data import get_testdata_file

    from haven.ingest import ingest

    root = tmp_path_factory.mktemp("combined")
    source = root / "source"
    shutil.copytree(Path(get_testdata_file("CT_small.dcm")).parent, source / "pydicom")
    shutil.copytree(Path(deid_data.__file__).parent / "data", source / "deid",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py", "*.md"))
    ingest(source, root / "ingest")
    anonymize_into(source, root / "ingest", root / "anon", KEY)
    return {"source": source, "ingest": root / "ingest", "out": root / "anon"}


def test_combined_corpus_passes_and_its_planted_values_are_found(combined, tmp_path):
    result = audit_of(combined["out"], combined["ingest"], key=KEY)
    assert result["passed"], result["findings"]  # was: BodyPartExamined (BranchOfService)
    assert result["files"] > 60
    # every planted value is still found: the junk category in a non-coded element of the other
    # patient's output, and as a coded value in its own patient's output
    idents = _rows(combined["ingest"] / "identifiers.csv")
    branch = next(r for r in idents if r["tag"].endswith("BranchOfService"))
    inputs = _rows(combined["ingest"] / "manifest.csv")
    log = [r for r in _rows(combined["out"] / "anonymization.log.csv") if r["output"]]
    own = next(r["output"] for r in log if inputs[int(r["input_index"])]["patient_id"] == branch["patient_id"])
    other = next(r["output"] for r in log if inputs[int(r["input_index"])]["patient_id"] != branch["patient_id"])
    anon = tmp_path / "anon"
    shutil.copytree(combined["out"], anon)
    for rel, keyword in ((own, "BodyPartExamined"), (other, "ImageComments")):
        ds = pydicom.dcmread(anon / "data" / rel)
        setattr(ds, keyword, branch["value"])
        ds.save_as(anon / "data" / rel)
    found = audit_of(anon, combined["ingest"], key=KEY)["findings"]
    where = {(f["file"], f["where"], f["kind"]) for f in found}
    assert (own, "BodyPartExamined", "BranchOfService") in where
    assert (other, "ImageComments", "BranchOfService") in where
    assert len(found) == 2


# ---------------------------------------------------------------------------------------------
# review and accept: one output with the original station name planted in two places


@pytest.fixture
def leak(tmp_path):
    from haven.ingest import ingest

    src = tmp_path / "src" / "ct"
    src.mkdir(parents=True)
    _dicom("PID-1001-XY", 0, 0).save_as(src / "a.dcm", enforce_file_format=True)
    ingest(tmp_path / "src", tmp_path / "ingest")
    out = tmp_path / "anon"
    anonymize_into(tmp_path / "src", tmp_path / "ingest", out, KEY)
    target = out / "data" / _rows(out / "manifest.csv")[0]["file"]
    ds = pydicom.dcmread(target)
    ds.StationName = STATION
    ds.save_as(target)
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    return {"out": out, "ingest": tmp_path / "ingest", "target": target, "key_file": key_file,
            "result": out / "audit.json"}


def _cli(leak, accept=None, *extra, key_file=None):
    from haven.cli import main

    o, i = leak["out"], leak["ingest"]
    params = {"anonymize": {}, "audit": {"accept": accept or []}, "key_file": str(key_file or leak["key_file"]),
              "key_env": None}
    return main(["audit", "--data", str(o / "data"), "--manifest", str(o / "manifest.csv"),
                 "--log", str(o / "anonymization.log.csv"), "--identifiers", str(i / "identifiers.csv"),
                 "--ingest-manifest", str(i / "manifest.csv"), "--result", str(leak["result"]),
                 "--params", json.dumps(params), *extra])


def _gate(leak, accept, key=KEY):
    o, i = leak["out"], leak["ingest"]
    return gate([o / "data"], o / "manifest.csv", o / "anonymization.log.csv", i / "identifiers.csv",
                i / "manifest.csv", leak["result"], accept=accept, accept_key=key)


def _reviewed(leak, capsys) -> dict:
    """The acceptance line `haven audit --review` printed, filled in as a reviewer does."""
    assert _cli(leak, None, "--review") == 1
    text = capsys.readouterr().out
    line = next(x.strip() for x in text.splitlines() if x.strip().startswith("- {"))
    entry = yaml.safe_load(line)[0]
    assert entry["reason"] == REASON_TODO
    return {**entry, "reason": "station of the vendor's demo unit, no patient's", "accepted_by": "R. Eviewer"}


def test_review_prints_the_value_and_the_line_and_nothing_else_does(leak, capsys):
    assert _cli(leak) == 1
    logged = capsys.readouterr()
    assert "StationName" in logged.err and STATION not in logged.out + logged.err
    failed = leak["result"].with_name("audit.failed.json").read_text()
    assert STATION not in failed
    assert not leak["result"].exists()
    assert _cli(leak, None, "--review") == 1
    shown = capsys.readouterr().out
    assert STATION in shown and "StationName" in shown
    line = next(x.strip() for x in shown.splitlines() if x.strip().startswith("- {"))
    entry = yaml.safe_load(line)[0]
    assert entry["value_hmac"] == value_hash(KEY, STATION) and entry["place"] == "StationName"
    assert STATION not in line  # the line holds the keyed hash, never the value
    assert not leak["result"].exists()  # --review writes nothing


def test_accepted_finding_passes_and_is_recorded_without_values(leak, capsys):
    entry = _reviewed(leak, capsys)
    assert _cli(leak, [entry]) == 0
    logged = capsys.readouterr()
    assert "1 finding(s) accepted" in logged.out
    text = leak["result"].read_text()
    result = json.loads(text)
    assert result["passed"] and result["findings"] == []
    assert result["accepted"]["count"] == 1 and result["accepted"]["unused"] == 0
    assert result["accepted"]["entries"] == [{"place": "StationName", "reason": entry["reason"],
                                              "accepted_by": "R. Eviewer", "accepted_on": entry["accepted_on"],
                                              "findings": 1}]
    for secret in (STATION, entry["value_hmac"]):
        assert secret not in text and secret not in logged.out + logged.err
    assert accepted_rows(result) == [("StationName", entry["reason"], "R. Eviewer", entry["accepted_on"], 1)]
    assert _cli(leak, [entry], "--review") == 0  # nothing left to review
    assert STATION not in capsys.readouterr().out


def test_the_accepted_value_in_another_place_still_fails(leak, capsys):
    entry = _reviewed(leak, capsys)
    ds = pydicom.dcmread(leak["target"])
    ds.InstitutionalDepartmentName = STATION
    ds.save_as(leak["target"])
    result, _ = _gate(leak, [entry])
    assert not result["passed"]
    assert [f["where"] for f in result["findings"]] == ["InstitutionalDepartmentName"]
    assert result["accepted"]["count"] == 1
    # another value at the accepted place is no accepted value
    ds.InstitutionalDepartmentName = "RADIOLOGY"
    ds.StationName = f"{STATION} 2"
    ds.save_as(leak["target"])
    assert not _gate(leak, [entry])[0]["passed"]


def test_a_wrong_key_or_hash_does_not_accept(leak, capsys):
    entry = _reviewed(leak, capsys)
    for bad in ({**entry, "value_hmac": value_hash(OTHER_KEY, STATION)},
                {**entry, "value_hmac": keys.digest(KEY, "pseudonym", STATION).hex()},
                {**entry, "place": "InstitutionName"}):
        result, _ = _gate(leak, [bad])
        assert not result["passed"] and result["accepted"]["count"] == 0 and result["accepted"]["unused"] == 1
    assert not _gate(leak, [entry], key=OTHER_KEY)[0]["passed"]  # the project's key is another one


def test_malformed_accept_entries_name_the_key_and_the_fix():
    good = {"value_hmac": "0" * 64, "place": "StationName", "reason": "demo unit", "accepted_by": "R"}
    assert check_entries([good]) == [good]
    cases = [({**good, "value_hmac": "ABDOMEN"}, "audit.accept[0].value_hmac", "haven audit --review"),
             ({**good, "reason": REASON_TODO}, "audit.accept[0].reason", "replace"),
             ({k: v for k, v in good.items() if k != "accepted_by"}, "audit.accept[0].accepted_by", "give"),
             ({**good, "value": "x"}, "audit.accept[0]: unknown key(s) value", "known"),
             ({**good, "accepted_on": "yesterday"}, "audit.accept[0].accepted_on", "YYYY-MM-DD")]
    for entry, key, fix in cases:
        with pytest.raises(ConfigError) as err:
            check_entries([entry])
        assert key in str(err.value) and fix in str(err.value)
    with pytest.raises(ConfigError, match="needs the project key"):
        gate([Path("nowhere")], Path("m"), Path("l"), Path("i"), Path("im"), Path("r.json"), accept=[good])
    config = {"projects": {"p": {"source": ".", "audit": {"accept": [{**good, "value_hmac": "ABDOMEN"}]}}}}
    with pytest.raises(ConfigError, match=r"projects\.p\.audit\.accept\.0\.value_hmac"):
        validate(config)
