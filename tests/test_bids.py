"""NIfTI volumes and BIDS datasets through the gate: ingest, de-identification, audit.

A small BIDS dataset is written here with the PHI a real export carries (names and record
numbers in the header's text fields and in two kinds of extension, an inherited sidecar naming the
site, dates in sidecars and session labels, a participants table with names); the audit must find
every kind on the originals and none in haven's outputs.  Defacing is off here (a noise volume has
no brain: tests/test_deface_real.py defaces real anatomy) except where its gate is the subject.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from haven import keys
from haven.deid.audit import audit_tree
from haven.deid.volumes import MARK, MARK_DEFACED, check_defaced, output_name
from haven.ingest import ingest
from haven.sources import bids

SUBJECTS = [("MRN4821937", "20190304", "DOE^JANE", "F", "63", "control"),
            ("MRN5550001", "20200101", "ROE^RICHARD", "M", "70", "atrophy"),
            ("MRN7770002", "20210505", "POE^EDGAR", "M", "55", "atrophy"),
            ("MRN1112223", "20180808", "LOE^ANNA", "F", "48", "control"),
            ("MRN3334445", "20170707", "MOE^ZOE", "F", "81", "control")]


def _dicom_extension(name: str, pid: str) -> bytes:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName, ds.PatientID = name, pid
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return out.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids") / "src"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tage\tsex\tgroup\tname"]
    rows += [f"sub-{m}\t{age}\t{sex}\t{group}\t{name}" for m, _, name, sex, age, group in SUBJECTS]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    # inherited by every T1w (BIDS inheritance principle): the site is only here
    (root / "T1w.json").write_text(json.dumps({"InstitutionName": "SAN CARLOS HOSPITAL", "MagneticFieldStrength": 3}))
    rng = np.random.default_rng(0)
    for mrn, ses, name, *_ in SUBJECTS:
        folder = root / f"sub-{mrn}" / f"ses-{ses}" / "anat"
        folder.mkdir(parents=True)
        img = nib.Nifti1Image((rng.random((20, 24, 18)) * 100).astype(np.int16), np.diag([-2.0, 2.0, 2.5, 1.0]))
        img.header["descrip"] = f"{name} {ses}".encode()
        img.header["aux_file"] = mrn.encode()
        img.header["intent_name"] = b"HOSP-77"
        img.header["db_name"] = b"ROOM7DB"
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, json.dumps({"PatientID": mrn}).encode()))
        img.header.extensions.append(nib.nifti1.Nifti1Extension(2, _dicom_extension(name, "H" + mrn[3:])))
        stem = f"sub-{mrn}_ses-{ses}_acq-mprage_T1w"
        nib.save(img, folder / f"{stem}.nii.gz")
        (folder / f"{stem}.json").write_text(json.dumps({
            "AcquisitionDateTime": f"{ses[:4]}-{ses[4:6]}-{ses[6:]}T10:22:33", "PatientName": name,
            "RepetitionTime": 2.3, "StationName": "MRI-ROOM-7", "ScannerNickname": "Big Bertha"}))
    (root / "derivatives" / "lesions").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), root / "derivatives" / "lesions" / "m.nii.gz")
    (root / "bad.nii").write_bytes(b"not a volume" * 40)
    (root / "truncated.nii.gz").write_bytes((root / f"sub-{SUBJECTS[0][0]}" / f"ses-{SUBJECTS[0][1]}" / "anat" /
                                            f"sub-{SUBJECTS[0][0]}_ses-{SUBJECTS[0][1]}_acq-mprage_T1w.nii.gz"
                                            ).read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def ingested(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    summary = ingest(dataset, out, dataset / "participants.tsv", "participant_id", "group")
    return out, summary


def test_ingest_reads_one_row_per_volume_with_its_bids_fields(ingested):
    out, summary = ingested
    m = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert summary["accepted"] == len(SUBJECTS) and summary["patients"] == len(SUBJECTS)
    assert set(m["kind"]) == {"nifti"} and not m["path"].str.contains("derivatives").any()
    row = m[m["patient_id"] == f"sub-{SUBJECTS[0][0]}"].iloc[0]
    assert (row["session"], row["suffix"], row["modality"]) == (f"ses-{SUBJECTS[0][1]}", "T1w", "MR")
    assert (row["shape"], row["spacing"], row["orientation"]) == ("20x24x18", "2x2x2.5", "LAS")
    # participants.tsv gives label, sex and age; the inherited sidecar the site
    assert (row["label"], row["sex"], row["age"], row["site"]) == ("control", "F", "63", "SAN CARLOS HOSPITAL")


def test_bad_volumes_are_quarantined_with_the_fix_and_metadata_is_not_a_file(ingested):
    out, _ = ingested
    q = pd.read_csv(out / "quarantine.csv", dtype=str).set_index("path")["reason"]
    assert set(q.index) == {"bad.nii", "truncated.nii.gz"}  # no sidecar, table or README among them
    assert "not a readable NIfTI" in q["bad.nii"] and "remove it" in q["bad.nii"]
    assert "truncated" in q["truncated.nii.gz"] or "not a readable" in q["truncated.nii.gz"]


def test_ingest_records_every_kind_of_planted_phi_but_not_the_labels(ingested):
    out, _ = ingested
    ids = pd.read_csv(out / "identifiers.csv", dtype=str, keep_default_na=False)
    mine = ids[ids["patient_id"] == f"sub-{SUBJECTS[0][0]}"]
    values = dict(zip(mine["tag"], mine["value"]))
    mrn, ses, name = SUBJECTS[0][:3]
    assert values["nifti.descrip"] == f"{name} {ses}" and values["nifti.aux_file"] == mrn
    assert values["nifti.intent_name"] == "HOSP-77" and values["nifti.db_name"] == "ROOM7DB"
    assert values["nifti.extension0.PatientID"] == mrn  # JSON extension
    assert values["nifti.extension1.PatientName"] == name and values["nifti.extension1.PatientID"] == "H" + mrn[3:]
    assert values["sidecar.InstitutionName"] == "SAN CARLOS HOSPITAL"  # inherited from T1w.json
    assert values["sidecar.AcquisitionDateTime.date"] == ses and values["sidecar.StationName"] == "MRI-ROOM-7"
    assert values["BIDS.subject"] == mrn and values["BIDS.session"] == f"ses-{ses}"
    assert values["participants.name"] == name
    assert not set(ids["value"]) & {"control", "atrophy"}  # a label column is not an identifier


@pytest.fixture(scope="module")
def deidentified(dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("deid")
    key = work / "k.key"
    keys.create_key(key)
    run = subprocess.run([sys.executable, "-m", "haven.cli", "deid", str(dataset), str(work / "out"), "--key-file",
                          str(key), "--work", str(work / "phi"), "--json", "--no-deface-volumes"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return work, json.loads(run.stdout.strip().splitlines()[-1]), key.read_bytes().strip()


def test_deid_writes_pseudonymous_bids_names_and_passes_its_audit(deidentified):
    work, summary, _ = deidentified
    assert summary["audit_passed"] and summary["deidentified"] == len(SUBJECTS)
    data = work / "out" / "data"
    names = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert len(names) == 2 * len(SUBJECTS)  # a volume and its sidecar each
    for mrn, ses, *_ in SUBJECTS:
        assert not any(mrn in n or ses in n for n in names)
    ents = bids.entities(Path(names[0]).name)
    assert ents["subject"].startswith("P") and ents["session"].startswith("S") and ents["acquisition"] == "mprage"


def test_a_volume_keeps_geometry_and_voxels_and_loses_every_text_and_extension(dataset, deidentified):
    work, _, key = deidentified
    mrn, ses = SUBJECTS[0][:2]
    src = dataset / f"sub-{mrn}" / f"ses-{ses}" / "anat" / f"sub-{mrn}_ses-{ses}_acq-mprage_T1w.nii.gz"
    rel, _ = output_name({"patient_id": f"sub-{mrn}", "session": f"ses-{ses}",
                          "path": src.relative_to(dataset).as_posix()}, key)
    before, after = nib.load(src), nib.load(work / "out" / "data" / rel)
    assert np.array_equal(np.asanyarray(before.dataobj), np.asanyarray(after.dataobj))
    assert np.allclose(before.affine, after.affine) and after.get_data_dtype() == before.get_data_dtype()
    assert after.header["descrip"].item().decode() == MARK and not after.header.extensions
    assert all(not after.header[f].item() for f in ("aux_file", "intent_name", "db_name"))


def test_the_sidecar_keeps_acquisition_keys_and_shifts_the_date(dataset, deidentified):
    work, _, key = deidentified
    mrn, ses = SUBJECTS[0][:2]
    rel, _ = output_name({"patient_id": f"sub-{mrn}", "session": f"ses-{ses}",
                          "path": f"sub-{mrn}/ses-{ses}/anat/sub-{mrn}_ses-{ses}_acq-mprage_T1w.nii.gz"}, key)
    meta = json.loads((work / "out" / "data" / rel.replace(".nii.gz", ".json")).read_text())
    # inherited acquisition key kept; site, name, station and the unknown key gone
    assert meta.keys() == {"AcquisitionDateTime", "MagneticFieldStrength", "RepetitionTime"}
    import datetime as dt

    shift = keys.day_shift(key, f"sub-{mrn}")
    expected = dt.date(int(ses[:4]), int(ses[4:6]), int(ses[6:])) + dt.timedelta(days=shift)
    assert meta["AcquisitionDateTime"] == expected.isoformat() + "T10:22:33"


def test_the_audit_finds_every_planted_kind_on_the_originals(dataset, deidentified):
    work, _, _ = deidentified
    found = audit_tree(dataset, work / "phi" / "identifiers.csv", ocr=False)
    places = {f["where"] for f in found["findings"]}
    for where in ("NIfTI descrip", "NIfTI aux_file", "NIfTI intent_name", "NIfTI db_name", "NIfTI extension 0",
                  "NIfTI extension 1", "JSON InstitutionName", "JSON PatientName", "JSON AcquisitionDateTime",
                  "JSON StationName", "file name"):
        assert where in places, where


def test_the_audit_fails_on_text_put_back_into_an_output(deidentified, tmp_path):
    import shutil

    work, _, _ = deidentified
    data = tmp_path / "data"
    shutil.copytree(work / "out" / "data", data)
    volume = next(data.rglob("*.nii.gz"))
    img = nib.load(volume)
    img.header["descrip"] = SUBJECTS[0][2].encode()
    nib.save(img, volume)
    side = next(data.rglob("*.json"))
    side.write_text(json.dumps({"InstitutionName": "SAN CARLOS HOSPITAL"}))
    found = audit_tree(data, work / "phi" / "identifiers.csv", ocr=False)["findings"]
    assert {"NIfTI descrip", "JSON InstitutionName"} <= {f["where"] for f in found}


def test_an_undefaced_head_volume_fails_the_audit(deidentified):
    work, _, _ = deidentified
    manifest = pd.read_csv(work / "out" / "manifest.csv", dtype=str, keep_default_na=False).to_dict("records")
    data = work / "out" / "data"
    opts = {"volumes": True, "min_slices": 16}
    found = check_defaced(data, manifest, opts)
    assert len(found) == len(SUBJECTS) and {f["kind"] for f in found} == {"head volume not defaced"}
    assert not check_defaced(data, manifest, {"volumes": False})
    volume = data / manifest[0]["file"]
    img = nib.load(volume)
    img.header["descrip"] = MARK_DEFACED.encode()
    nib.save(img, volume)
    assert len(check_defaced(data, manifest, opts)) == len(SUBJECTS) - 1


def test_sidecars_inherit_from_the_top_down_and_deeper_wins(tmp_path):
    root = tmp_path
    (root / "dataset_description.json").write_text("{}")
    (root / "T1w.json").write_text(json.dumps({"EchoTime": 1, "FlipAngle": 8}))
    (root / "acq-fast_T1w.json").write_text(json.dumps({"EchoTime": 2}))
    (root / "bold.json").write_text(json.dumps({"TaskName": "rest"}))
    folder = root / "sub-01" / "anat"
    folder.mkdir(parents=True)
    (folder / "sub-01_acq-fast_T1w.json").write_text(json.dumps({"FlipAngle": 9}))
    fast, slow = folder / "sub-01_acq-fast_T1w.nii.gz", folder / "sub-01_acq-slow_T1w.nii.gz"
    assert bids.sidecar(fast, root) == {"EchoTime": 2, "FlipAngle": 9}
    assert bids.sidecar(slow, root) == {"EchoTime": 1, "FlipAngle": 8}


def test_participant_columns_that_identify_are_told_from_labels():
    rows = [{"participant_id": f"sub-{i}", "group": "a" if i % 2 else "b", "hospital_number": f"H{i}9",
             "score": str(i * 1.5), "nickname": f"n{i}", "age": str(40 + i)} for i in range(6)]
    assert bids.identifying_columns(rows) == {"hospital_number", "nickname"}


def test_a_bids_volume_never_takes_its_datatype_folder_as_its_label(dataset, tmp_path):
    ingest(dataset, tmp_path)  # no label table, labels required: quarantined with the fix
    q = pd.read_csv(tmp_path / "quarantine.csv", dtype=str)
    reasons = q[q["path"].str.startswith("sub-")]["reason"]
    assert len(reasons) == len(SUBJECTS) and reasons.str.contains("label_key: participant_id").all()
    ingest(dataset, tmp_path, labels_required=False)  # de-identification only: an empty label, not "anat"
    m = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(m) == len(SUBJECTS) and set(m["label"]) == {""}


def test_the_brain_mri_demo_passes_the_gate_with_all_its_planted_phi_found_on_the_originals(tmp_path):
    """The demo's own BIDS export (names, dates, inherited sidecars, both extension kinds, UTF-8
    names in the header): de-identified with the audit passing, while the same audit run over the
    originals finds each kind of place."""
    from haven.demomri import make_brain_mri

    summary = make_brain_mri(tmp_path / "demo", subjects=6)
    key = tmp_path / "k.key"
    keys.create_key(key)
    run = subprocess.run([sys.executable, "-m", "haven.cli", "deid", str(tmp_path / "demo" / "bids"),
                          str(tmp_path / "out"), "--key-file", str(key), "--work", str(tmp_path / "phi"), "--json",
                          "--no-deface-volumes"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["audit_passed"] and result["deidentified"] == summary["volumes"]
    assert result["quarantined"] == summary["bad_files"]
    found = audit_tree(tmp_path / "demo" / "bids", tmp_path / "phi" / "identifiers.csv", ocr=False)["findings"]
    places = {f["where"] for f in found}
    assert {"NIfTI descrip", "NIfTI aux_file", "NIfTI intent_name", "NIfTI db_name", "JSON InstitutionName",
            "JSON PatientName", "JSON AcquisitionDateTime", "file name"} <= places
    assert any(p.startswith("NIfTI extension") for p in places)


@pytest.mark.parametrize("name", ["sub-01_ses-02_acq-mprage_run-01_T1w.nii.gz", "sub-MRN1_ses-20190304_T1w.json",
                                  "T1w.json", "acq-fast_rec-norm_echo-2_T2w.nii", "sub-02_task-rest_dir-AP_bold.nii.gz"])
def test_entities_agree_with_pybids(name):
    from bids.layout import parse_file_entities

    # pybids' index labels are padded ints (run-01 == run-1): compared as numbers
    theirs = {k: str(int(v)) if isinstance(v, int) else str(v) for k, v in parse_file_entities("/" + name).items()}
    assert bids.entities(name) == theirs


def test_volume_masks_from_bids_derivatives_travel_with_their_volumes(tmp_path):
    """A segmentation project's masks in derivatives/ (mirroring the raw paths): each volume's mask
    is found, checked against the volume's grid, re-encoded and written beside the de-identified
    volume; a mask on another grid quarantines its volume; the audit passes."""
    from haven.deid.anonymize import anonymize
    from haven.deid.audit import audit
    from haven.demomri import make_brain_mri

    summary = make_brain_mri(tmp_path / "demo", subjects=4)
    root = tmp_path / "demo" / "bids"
    lesions = root / "derivatives" / "lesions"
    wrong = sorted(lesions.rglob("*_T1w.nii.gz"))[-1]
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), wrong)
    seg = {"masks": str(lesions), "mask_suffix": "_mask"}
    ingest(root, tmp_path / "i", root / "participants.tsv", "participant_id", "group", segmentation=seg)
    m = pd.read_csv(tmp_path / "i" / "manifest.csv", dtype=str, keep_default_na=False)
    q = pd.read_csv(tmp_path / "i" / "quarantine.csv", dtype=str)
    assert (m["mask"] != "").all() and len(m) == summary["volumes"] - 1
    assert q["reason"].str.contains("on the volume's own grid").sum() == 1
    key = b"k" * 32
    out = tmp_path / "a"
    anonymize(root, tmp_path / "i" / "manifest.csv", key, data=out / "data", manifest=out / "manifest.csv",
              log_csv=out / "log.csv", quarantine=out / "q.csv", options={"deface": {"volumes": False}},
              masks=lesions)
    a = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(a) == len(m) and a["mask"].str.endswith(".mask.nii.gz").all()
    for file, mask in zip(a["file"], a["mask"]):
        vol, msk = nib.load(out / "data" / file), nib.load(out / "data" / mask)
        assert vol.shape == msk.shape and np.allclose(vol.affine, msk.affine) and not msk.header.extensions
    result = audit([out / "data"], out / "manifest.csv", out / "log.csv", tmp_path / "i" / "identifiers.csv",
                   tmp_path / "i" / "manifest.csv", ocr=False, deface={"volumes": False})
    assert result["passed"], result["findings"][:5]


def test_predictions_of_volumes_join_back_to_their_originals_through_the_key(deidentified, tmp_path):
    """reidentify recomputes each volume's keyed BIDS name from the PHI-zone manifest (it matched none
    of a brain-mri trial run's 22 predictions before)."""
    from haven.predict.reidentify import join

    work, _, key = deidentified
    manifest = pd.read_csv(work / "out" / "manifest.csv", dtype=str, keep_default_na=False)
    predictions = tmp_path / "predictions.csv"
    pd.DataFrame({"file": "0/" + manifest["file"], "kind": "nifti", "patient": manifest["patient"], "instance": "",
                  "predicted": "control"}).to_csv(predictions, index=False)
    rows, _, counts = join(predictions, work / "phi" / "manifest.csv", key)
    assert counts["matched"] == len(SUBJECTS) and counts["unmatched"] == 0
    assert {r["patient_id"] for r in rows} == {f"sub-{s[0]}" for s in SUBJECTS}
    assert join(predictions, work / "phi" / "manifest.csv", b"another key" * 3)[2]["matched"] == 0


def test_a_time_of_day_is_dropped_from_a_sidecar_but_not_recorded_as_an_identifier(ingested):
    """The shifted AcquisitionDateTime keeps its time (as a DICOM date-time shift does): the removed
    AcquisitionTime, recorded, would be "found" in it (the pipeline's leak scan did, on a brain-mri
    trial run)."""
    from haven.deid import sidecar

    meta = {"AcquisitionTime": "10:22:33.500000", "AcquisitionDateTime": "2019-03-04T10:22:33.5"}
    assert {k for k, _ in sidecar.identifiers(meta)} == {"sidecar.AcquisitionDateTime.date",
                                                        "sidecar.AcquisitionDateTime.text"}
    assert sidecar.clean(meta, -3)[0] == {"AcquisitionDateTime": "2019-03-01T10:22:33.5"}
