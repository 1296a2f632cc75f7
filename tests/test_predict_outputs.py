"""The clinician's results of a prediction run (PHI zone): the re-identified copy and the DICOM SRs.

Built for real with the pipeline's own functions: CT files with planted PHI, de-identified and
audited (haven.deid.oneshot), predicted (haven.predict.stage) with a small bundle, then the
`haven reidentify` and `haven report-sr` commands.  The originals are checked against the
original files, never against the tables under test.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundles import ct_bundle, ct_files  # noqa: E402

from haven import keys  # noqa: E402
from haven.cli import main  # noqa: E402
from haven.io import read_rows  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from haven.deid.oneshot import deidentify
    from haven.learn.preprocess import Inputs
    from haven.predict.bundle import Bundle
    from haven.predict.stage import predict

    tmp = tmp_path_factory.mktemp("results")
    src = tmp / "export"
    files = ct_files(src, 4)
    # two instances of one study (another series): one SR must carry both
    ds = pydicom.dcmread(files[1])
    ds.StudyInstanceUID = pydicom.dcmread(files[0]).StudyInstanceUID
    ds.save_as(files[1], enforce_file_format=True)
    key_file = keys.create_key(tmp / "secret" / "haven.key")
    gate = deidentify(src, tmp / "out", keys.load_key(key_file), work=tmp / "phi")
    assert gate["audit_passed"] and gate["deidentified"] == 4
    bundle = Bundle.load(*ct_bundle(tmp / "model"), name="haven-ct", version="7")
    predictions = tmp / "out" / "predictions.csv"
    predict(Inputs(Path(gate["manifest"]), Path(gate["audit"]), Path(gate["data"])), bundle, predictions,
            tmp / "out" / "summary.json")
    params = json.dumps({"key_file": str(key_file), "key_env": None, "demo_key": False})
    ingest_manifest = Path(gate["phi"]) / "manifest.csv"
    reidentified = Path(gate["phi"]) / "predictions.reidentified.csv"
    assert main(["reidentify", "--predictions", str(predictions), "--ingest-manifest", str(ingest_manifest),
                 "--out", str(reidentified), "--params", params]) == 0
    sr = Path(gate["phi"]) / "sr"
    assert main(["report-sr", "--reidentified", str(reidentified), "--source", str(src), "--out", str(sr),
                 "--params", params]) == 0
    return {"src": src, "files": files, "predictions": predictions, "ingest": ingest_manifest,
            "reidentified": reidentified, "sr": sr, "key_file": key_file, "tmp": tmp}


def _originals(files: list[Path]) -> dict[str, pydicom.Dataset]:
    """The original files' headers by SOPInstanceUID (the ground truth)."""
    return {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}


def test_every_reidentified_row_carries_the_ids_of_the_file_that_was_predicted(run):
    rows = list(read_rows(run["reidentified"]))
    predicted = {r["instance"]: r for r in read_rows(run["predictions"])}
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        original = pydicom.dcmread(run["src"] / row["path"], stop_before_pixels=True)
        assert row["patient_id"] == original.PatientID
        assert row["accession"] == original.AccessionNumber
        assert row["sop_uid"] == original.SOPInstanceUID and row["study_uid"] == original.StudyInstanceUID
        # the prediction joined is that file's: its anonymized copy has the keyed UID of this SOP UID
        anonymized = pydicom.dcmread(run["tmp"] / "out" / "data" / row["file"], stop_before_pixels=True)
        assert anonymized.SOPInstanceUID == row["instance"] == keys.uid(keys.load_key(run["key_file"]),
                                                                        original.SOPInstanceUID)
        assert row["pcal_hemorrhage"] == predicted[row["instance"]]["pcal_hemorrhage"]
    assert stat.S_IMODE(run["reidentified"].stat().st_mode) == 0o600


def test_the_safe_side_holds_no_original_identifier(run):
    text = run["predictions"].read_text()
    for d in _originals(run["files"]).values():
        for value in (d.PatientID, str(d.PatientName), d.AccessionNumber, d.SOPInstanceUID, d.StudyInstanceUID,
                      d.SeriesInstanceUID):
            assert value not in text


def test_a_wrong_key_matches_nothing_and_says_so(run, tmp_path, capsys):
    from haven.predict.reidentify import join

    rows, _, counts = join(run["predictions"], run["ingest"], b"another-key-of-32-bytes-long....")
    assert rows == [] and counts["matched"] == 0 and counts["unmatched"] == 4
    wrong = keys.create_key(tmp_path / "wrong.key")
    code = main(["reidentify", "--predictions", str(run["predictions"]), "--ingest-manifest", str(run["ingest"]),
                 "--out", str(tmp_path / "r.csv"), "--params",
                 json.dumps({"key_file": str(wrong), "key_env": None, "demo_key": False})])
    assert code == 2 and "not the key anonymize used" in capsys.readouterr().err


def test_one_valid_sr_per_original_study_references_its_instances_and_carries_the_probability(run):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    originals = _originals(run["files"])
    reidentified = {r["sop_uid"]: r for r in read_rows(run["reidentified"])}
    index = list(read_rows(run["sr"] / "index.csv"))
    studies = {d.StudyInstanceUID for d in originals.values()}
    assert len(index) == len(studies) == 3
    seen = set()
    for entry in index:
        path = run["sr"] / entry["sr_file"]
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        assert ds.Modality == "SR" and ds.StudyInstanceUID in studies
        members = [d for d in originals.values() if d.StudyInstanceUID == ds.StudyInstanceUID]
        assert ds.PatientID == members[0].PatientID and ds.AccessionNumber == members[0].AccessionNumber
        evidence = {s.ReferencedSOPInstanceUID for e in ds.CurrentRequestedProcedureEvidenceSequence
                    for series in e.ReferencedSeriesSequence for s in series.ReferencedSOPSequence}
        assert evidence == {d.SOPInstanceUID for d in members}
        groups = hd.sr.srread(path).content.get_image_measurement_groups()
        assert len(groups) == len(members)
        for g in groups:
            sop = g.source_images[0].referenced_sop_instance_uid
            row = reidentified[sop]
            assert g.finding_type.meaning == row["predicted"]
            (m,) = g.get_measurements(name=codes.DCM.Probability)
            assert m.value == pytest.approx(float(row[f"pcal_{row['predicted']}"]), abs=1e-6)
            assert m.unit == codes.UCUM.NoUnits
            algorithm = {c: [i.TextValue for i in hd.sr.utils.find_content_items(g[0], name=c, recursive=True)]
                         for c in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion)}
            assert algorithm == {codes.DCM.AlgorithmName: ["haven-ct"], codes.DCM.AlgorithmVersion: ["7"]} \
                == {codes.DCM.AlgorithmName: [row["model"]], codes.DCM.AlgorithmVersion: [row["model_version"]]}
            seen.add(sop)
    assert seen == set(originals)
    assert stat.S_IMODE(run["sr"].stat().st_mode) == 0o700


def test_the_commands_log_and_print_no_original_identifier(run, tmp_path, caplog, capsys):
    """The rules' logs lie outside the PHI zone: counts only (highdicom's INFO log names instances)."""
    import logging

    caplog.set_level(logging.DEBUG)
    params = json.dumps({"key_file": str(run["key_file"]), "key_env": None, "demo_key": False})
    assert main(["reidentify", "--predictions", str(run["predictions"]), "--ingest-manifest", str(run["ingest"]),
                 "--out", str(tmp_path / "r.csv"), "--params", params]) == 0
    assert main(["report-sr", "--reidentified", str(tmp_path / "r.csv"), "--source", str(run["src"]),
                 "--out", str(tmp_path / "sr"), "--params", params]) == 0
    out = capsys.readouterr()
    said = caplog.text + out.out + out.err
    assert "4 predicted instance(s)" in said
    for d in _originals(run["files"]).values():
        for value in (d.PatientID, str(d.PatientName), d.AccessionNumber, d.SOPInstanceUID, d.StudyInstanceUID):
            assert value not in said


def test_store_sr_sends_the_reports_to_the_pacs_filed_with_the_original_studies(run, tmp_path, monkeypatch, capsys):
    """STOW-RS to a real Orthanc on loopback (tests/orthanc.py), logged in as haven.fetch does."""
    import os

    import orthanc
    import requests

    from haven.config import section_defaults

    why = orthanc.missing()
    if why:
        if os.environ.get("HAVEN_SYSTEM_REQUIRED") == "1":
            pytest.fail(f"CI must run the PACS tests: {why}")
        pytest.skip(why)
    monkeypatch.setenv("HAVEN_TEST_PACS_LOGIN", f"{orthanc.USER}:{orthanc.PASSWORD}")
    pacs = {**section_defaults("pacs"), "auth": "basic", "credentials_env": "HAVEN_TEST_PACS_LOGIN"}
    params = json.dumps({"key_file": str(run["key_file"]), "key_env": None, "demo_key": False,
                         "predict": {**section_defaults("predict"), "store_sr": True}})
    server = orthanc.start(tmp_path / "orthanc")
    try:
        assert main(["report-sr", "--reidentified", str(run["reidentified"]), "--source", str(run["src"]),
                     "--out", str(tmp_path / "sr"), "--store-url", server.source, "--pacs", json.dumps(pacs),
                     "--params", params]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stored"] == 3
        for d in _originals(run["files"]).values():
            r = requests.get(f"{server.rest}/dicom-web/studies/{d.StudyInstanceUID}/series",
                             auth=(orthanc.USER, orthanc.PASSWORD), timeout=30)
            assert r.ok and [s["00080060"]["Value"] for s in r.json()] == [["SR"]]
    finally:
        orthanc.stop(server)


def test_images_join_through_the_keyed_name_of_their_path(tmp_path):
    """An image has no UIDs: its pseudonymous name (the keyed hash of its path) is the join key."""
    import numpy as np
    from bundles import gray_bundle, gray_files
    from PIL import Image

    from haven.deid.oneshot import deidentify
    from haven.learn.preprocess import Inputs
    from haven.predict.bundle import Bundle
    from haven.predict.reidentify import join
    from haven.predict.stage import predict

    files = gray_files(tmp_path / "export", 3)
    key = keys.load_key(keys.create_key(tmp_path / "secret" / "k"))
    gate = deidentify(tmp_path / "export", tmp_path / "out", key, work=tmp_path / "phi")
    predict(Inputs(Path(gate["manifest"]), Path(gate["audit"]), Path(gate["data"])),
            Bundle.load(*gray_bundle(tmp_path / "model"), name="g", version="1"),
            tmp_path / "p.csv", tmp_path / "s.json")
    rows, _, counts = join(tmp_path / "p.csv", Path(gate["phi"]) / "manifest.csv", key)
    assert counts["matched"] == 3 and counts["unmatched"] == 0
    by_path = {r["path"]: r for r in rows}
    assert set(by_path) == {f.name for f in files}
    for f in files:  # the prediction joined is that image's: its anonymized copy has the same pixels
        anonymized = Image.open(tmp_path / "out" / "data" / by_path[f.name]["file"])
        assert np.array_equal(np.asarray(anonymized), np.asarray(Image.open(f)))
        assert by_path[f.name]["patient_id"] == f.stem


def test_a_rerun_writes_the_same_report_uids(run, tmp_path):
    """The SR's UIDs derive from the study and the model only (they were random: pydicom's
    generate_uid ignores its entropy sources without a prefix), so a PACS receiving a re-run's
    reports replaces them instead of filing duplicates."""
    params = json.dumps({"key_file": str(run["key_file"]), "key_env": None, "demo_key": False})
    assert main(["report-sr", "--reidentified", str(run["reidentified"]), "--source", str(run["src"]),
                 "--out", str(tmp_path / "again"), "--params", params]) == 0
    first = {r["study_uid"]: r["sr_sop_uid"] for r in read_rows(run["sr"] / "index.csv")}
    again = {r["study_uid"]: r["sr_sop_uid"] for r in read_rows(tmp_path / "again" / "index.csv")}
    assert first == again and all(uid.startswith("2.25.") and len(uid) <= 64 for uid in first.values())
