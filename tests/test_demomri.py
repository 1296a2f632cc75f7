"""The brain-mri demo: a BIDS set of synthetic T1w volumes with planted PHI, groups and lesion masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("nilearn")  # only its shipped template is used

from haven import demomri  # noqa: E402

N = 6  # subjects: a few seconds


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    out = tmp_path_factory.mktemp("mri") / "brain-mri"
    summary = demomri.make_brain_mri(out, seed=0, subjects=N)
    return out / "bids", summary


def _volumes(root: Path) -> list[Path]:
    """The readable images (the two bad files are the only others)."""
    good = []
    for f in sorted(root.glob("sub-*/ses-*/anat/*_T1w.nii*")):
        try:
            nib.load(f).get_fdata()
        except Exception:
            continue
        good.append(f)
    return good


def _subject(f: Path) -> str:
    return f.name.split("_")[0]


def test_pybids_finds_every_volume_with_its_session_and_inherited_metadata(mri):
    bids = pytest.importorskip("bids")
    root, summary = mri
    layout = bids.BIDSLayout(root, validate=False)
    files = layout.get(suffix="T1w", extension=[".nii.gz", ".nii"])
    assert len(files) == summary["volumes"] + summary["bad_files"]
    rows = _rows(root / "participants.tsv")
    assert sorted(layout.get_subjects()) == sorted(r["participant_id"].removeprefix("sub-") for r in rows)
    assert all(f.get_entities()["session"].isdigit() and len(f.get_entities()["session"]) == 8 for f in files)
    own = {f.path: json.loads(Path(f.path.split(".nii")[0] + ".json").read_text()) for f in files}
    site0 = [f for f in files if "InstitutionName" not in own[f.path]]
    assert site0, "some volumes must leave InstitutionName to the top-level T1w.json"
    top = json.loads((root / "T1w.json").read_text())
    for f in site0:
        assert layout.get_metadata(f.path)["InstitutionName"] == top["InstitutionName"]
    other = [f for f in files if f not in site0]
    assert other and all(layout.get_metadata(f.path)["InstitutionName"] != top["InstitutionName"] for f in other)


def test_participants_table_has_labels_covariates_and_planted_phi(mri):
    root, summary = mri
    rows = _rows(root / "participants.tsv")
    assert list(rows[0]) == ["participant_id", "age", "sex", "site", "group", "lesion", "name", "mrn", "birth_date"]
    assert len(rows) == N == summary["subjects"]
    assert sum(r["group"] == "atrophy" for r in rows) == N // 2 == summary["atrophy"]
    assert {r["group"] for r in rows} == {"control", "atrophy"} and {r["sex"] for r in rows} <= {"M", "F"}
    assert sum(r["lesion"] == "1" for r in rows) == summary["lesion_subjects"] >= 1
    assert len({r["site"] for r in rows}) >= 2
    for r in rows:  # the label is the MRN, a PHI the de-identification must replace
        assert r["participant_id"] == f"sub-{r['mrn']}" and (root / r["participant_id"]).is_dir()
        assert 18 <= int(r["age"]) <= 95 and len(r["name"].split()) == 2 and r["birth_date"][4] == "-"
    assert set(json.loads((root / "participants.json").read_text())) == set(rows[0]) - {"participant_id"}


def test_every_kind_of_planted_phi_is_present(mri):
    pytest.importorskip("pydicom")
    root, _ = mri
    people = {r["participant_id"]: r for r in _rows(root / "participants.tsv")}
    with_dicom = 0
    for f in _volumes(root):
        person = people[_subject(f)]
        session = f.name.split("_")[1].removeprefix("ses-")
        meta = json.loads(Path(str(f).split(".nii")[0] + ".json").read_text())
        assert meta["PatientID"] == person["mrn"] and meta["AcquisitionDateTime"].replace("-", "").startswith(session)
        for key in ("AcquisitionTime", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
                    "DeviceSerialNumber", "PatientName", "PatientBirthDate", "PatientSex", "PatientAge"):
            assert meta[key], key
        assert meta["ConversionSoftware"] == "dcm2niix" and meta["RepetitionTime"] > 0
        hdr = nib.load(f).header
        family = person["name"].split()[1]
        assert family in hdr["descrip"].tobytes().decode() and session[:4] in hdr["descrip"].tobytes().decode()
        assert hdr["aux_file"].tobytes().rstrip(b"\0").decode() == person["mrn"]
        assert person["birth_date"].replace("-", "") in hdr["intent_name"].tobytes().decode()
        assert family[:8] in hdr["db_name"].tobytes().decode()
        ext = {e.get_code(): e for e in hdr.extensions}
        note = json.loads(ext[6].get_content())
        assert note["PatientID"] == person["mrn"] and note["PatientName"] and note["AcquisitionDateTime"]
        if 2 in ext:
            ds = ext[2].get_object()  # nibabel parses the DICOM bytes with pydicom
            assert ds.PatientID == person["mrn"] and str(ds.PatientName)
            with_dicom += 1
        sessions = _rows(root / _subject(f) / f"{_subject(f)}_sessions.tsv")
        assert f"ses-{session}" in {s["session_id"] for s in sessions}
    assert with_dicom >= 1


def test_datatypes_and_orientations_vary_and_keep_the_anatomy_in_world_space(mri):
    root, summary = mri
    files = _volumes(root)
    kinds = {(str(nib.load(f).get_data_dtype()), nib.load(f).dataobj.slope != 1) for f in files}
    assert kinds == {("int16", True), ("int16", False), ("float32", False)}  # int16 with and without scl_slope
    codes = {nib.aff2axcodes(nib.load(f).affine) for f in files}
    assert len(codes) >= 2 and summary["oblique"] >= 1
    # the lesion masks sit where the subject's lesions were drawn on the template, whatever the axes
    people = {f"sub-{p['mrn']}": p for p in demomri._subjects(N, np.random.default_rng(0), 1_000_000)}
    checked = 0
    for f in files:
        lesions = people[_subject(f)]["lesions"]
        if not lesions:
            continue
        mask = nib.load(root / "derivatives" / "lesions" / f.relative_to(root))
        ijk = np.argwhere(np.asarray(mask.dataobj) > 0)
        world = nib.affines.apply_affine(mask.affine, ijk)
        near = min(np.linalg.norm(world - les["centre"], axis=1).min() for les in lesions)
        assert near < 12, f"{f.name}: mask {near:.1f} mm from the nearest lesion centre"
        checked += 1
    assert checked >= 1


def test_masks_share_the_image_grid_and_mark_lesions_only_in_lesion_subjects(mri):
    root, summary = mri
    lesion = {r["participant_id"]: r["lesion"] == "1" for r in _rows(root / "participants.tsv")}
    files = _volumes(root)
    assert len(files) == summary["volumes"] == summary["masks"]
    for f in files:
        img = nib.load(f)
        mask = nib.load(root / "derivatives" / "lesions" / f.relative_to(root))
        m = np.asarray(mask.dataobj)
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert mask.shape == img.shape == demomri.SHAPE and np.allclose(mask.affine, img.affine)
        assert bool(m.any()) == lesion[_subject(f)], f.name
        if m.any():  # a lesion is much brighter or darker than the white matter around it
            data = np.asarray(img.dataobj, dtype=np.float32)
            wm = np.percentile(data[data > 0.3 * np.percentile(data, 99)], 75)
            assert abs(np.median(data[m > 0]) / wm - 1) > 0.2
    desc = json.loads((root / "derivatives" / "lesions" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"


def _dark_fraction(f: Path) -> float:
    """Share of the periventricular region (world mm, template's lateral ventricles) darker than half
    the brain's white matter: CSF there grows with atrophy."""
    img = nib.load(f)
    data = np.asarray(img.dataobj, dtype=np.float32)
    world = nib.affines.apply_affine(img.affine, np.indices(data.shape).reshape(3, -1).T)
    roi = (np.sum(((world - demomri._VENTRICLES) / demomri._VENTRICLE_REACH) ** 2, axis=1) < 1).reshape(data.shape)
    brain = data > 0.3 * np.percentile(data, 99)
    return float(np.mean(data[roi] < 0.5 * np.percentile(data[brain], 75)))


def test_atrophy_group_has_more_csf_around_the_ventricles(mri):
    root, _ = mri
    group = {r["participant_id"]: r["group"] for r in _rows(root / "participants.tsv")}
    dark = {"control": [], "atrophy": []}
    for f in _volumes(root):
        dark[group[_subject(f)]].append(_dark_fraction(f))
    assert min(dark["atrophy"]) > max(dark["control"]) + 0.1, dark


def test_bad_files_fail_to_load(mri):
    root, summary = mri
    truncated = [f for f in root.glob("sub-*/ses-*/anat/*.nii.gz") if f not in _volumes(root)]
    not_nifti = list(root.glob("sub-*/ses-*/anat/*.nii"))
    assert len(truncated) == len(not_nifti) == 1 and summary["bad_files"] == 2
    nib.load(truncated[0])  # the header survives the cut, the voxels do not
    with pytest.raises(Exception):
        nib.load(truncated[0]).get_fdata()
    with pytest.raises(Exception):
        nib.load(not_nifti[0])


def test_same_seed_same_bytes_other_seed_other_subjects(mri, tmp_path):
    root, _ = mri
    again = tmp_path / "again"
    demomri.make_brain_mri(again, seed=0, subjects=N)
    mine = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert mine == sorted(p.relative_to(again / "bids") for p in (again / "bids").rglob("*") if p.is_file())
    assert all((root / p).read_bytes() == (again / "bids" / p).read_bytes() for p in mine)
    other = demomri.make_brain_mri_new(tmp_path / "new", seed=0, subjects=3)
    new_root = tmp_path / "new" / "bids"
    rows = _rows(new_root / "participants.tsv")
    assert list(rows[0]) == ["participant_id", "age", "sex", "site", "name", "mrn", "birth_date"]
    assert not {r["mrn"] for r in rows} & {r["mrn"] for r in _rows(root / "participants.tsv")}
    assert not (new_root / "derivatives").exists() and other["bad_files"] == 0
    assert len(_volumes(new_root)) == other["volumes"] == len(list(new_root.glob("sub-*/ses-*/anat/*.nii*")))


def test_missing_template_names_the_fix(monkeypatch):
    monkeypatch.setattr(demomri.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install nilearn"):
        demomri.template_dir()
