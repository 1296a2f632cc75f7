"""A volume project (``preprocess.dims: 3``) through preprocess: a small BIDS dataset of NIfTI
volumes, labelled by participants.tsv and de-identified by the pipeline's own stages, becomes
three Zarr stores of one volume per chunk, split by patient, each volume mappable back onto its
file's grid.  Defacing is off (a synthetic blob has no face: tests/test_deface_real.py defaces)."""

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr

from haven import keys
from haven.deid.anonymize import anonymize
from haven.deid.audit import gate
from haven.deid.oneshot import anonymize_options
from haven.ingest import Tables, ingest
from haven.learn import preprocess as pp
from haven.learn.volumes import unfit_volume

# (shape, voxel sizes in mm, label): both orientations, anisotropic voxels, both labels
SUBJECTS = [((20, 24, 22), (-2.0, 2.0, 2.5), "control"), ((26, 22, 20), (2.0, 2.0, 2.0), "atrophy"),
            ((24, 28, 22), (-2.0, 2.0, 2.0), "control"), ((22, 20, 26), (2.0, -2.0, 2.5), "atrophy"),
            ((28, 24, 24), (-2.0, 2.0, 2.0), "control"), ((20, 26, 20), (2.0, 2.0, 2.5), "atrophy"),
            ((24, 24, 28), (-2.0, 2.0, 2.0), "control"), ((22, 22, 22), (2.0, 2.0, 2.0), "atrophy")]
# MONAI's LoadImage sets up its DICOM reader too, and says so on a machine without nvImageCodec
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
PARAMS = {"dims": 3, "size": 16, "spacing": 2, "mode": "mr", "workers": 1}


def _blob(shape, zooms, rng):
    """An ellipsoid of brain-like values (radius 11 mm) off the centre, zero around it (as skull-stripped)."""
    grid = np.meshgrid(*[(np.arange(n) - n * 0.45) * abs(z) for n, z in zip(shape, zooms)], indexing="ij")
    inside = sum((g / r) ** 2 for g, r in zip(grid, (11.0, 10.0, 9.0))) <= 1
    return np.where(inside, 300 + rng.normal(0, 40, shape), 0).astype(np.int16)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    work = tmp_path_factory.mktemp("vol")
    src = work / "bids"
    src.mkdir()
    (src / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tgroup"] + [f"sub-{i:02d}\t{label}" for i, (_, _, label) in enumerate(SUBJECTS)]
    (src / "participants.tsv").write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    for i, (shape, zooms, _) in enumerate(SUBJECTS):
        folder = src / f"sub-{i:02d}" / "anat"
        folder.mkdir(parents=True)
        affine = np.diag([*zooms, 1.0])
        nib.save(nib.Nifti1Image(_blob(shape, zooms, rng), affine), folder / f"sub-{i:02d}_T1w.nii.gz")
        (folder / f"sub-{i:02d}_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3}))
    key = keys.load_key(keys.create_key(work / "k.key"))
    tables, out = Tables.in_folder(work / "phi"), work / "out"
    (work / "phi").mkdir()
    ingest(src, tables, src / "participants.tsv", "participant_id", "group")
    opts = anonymize_options({"deface": {"volumes": False}})
    anonymize(src, tables.manifest, key, data=out / "data", manifest=out / "manifest.csv",
              log_csv=out / "log.csv", quarantine=out / "quarantine.csv", options=opts)
    result, _ = gate([out / "data"], out / "manifest.csv", out / "log.csv", tables.identifiers, tables.manifest,
                     out / "audit.json", options=opts, key=key)
    assert result["passed"], result["findings"]
    return out


@pytest.fixture
def threads(monkeypatch):
    """Dask workers as a thread of this process: no worker start and imports (the fixture
    ``stores`` runs the real worker processes, which receive the arrays pickled)."""
    from dask.distributed import Client, LocalCluster

    monkeypatch.setattr(pp, "_client", lambda params: Client(LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")))


@pytest.fixture(scope="module")
def stores(audited, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    stats = pp.preprocess(audited, out, PARAMS, seed=0)
    return out, stats


def test_each_split_is_a_5d_store_of_one_volume_per_chunk(stores):
    out, stats = stores
    total = 0
    for name in pp.SPLITS:
        g = zarr.open_group(out / f"{name}.zarr", mode="r")
        n = g["images"].shape[0]
        total += n
        assert g["images"].shape == (n, 1, 16, 16, 16) and g["images"].chunks == (1, 1, 16, 16, 16)
        assert g["images"].dtype == np.uint8 and "masks" not in g
        assert g["info"].shape == g["labels"].shape == g["patient"].shape == (n,)
        attrs = dict(g.attrs)
        assert attrs["dims"] == 3 and attrs["size"] == [16, 16, 16] and attrs["spacing"] == [2.0, 2.0, 2.0]
        assert attrs["channels"] == 1 and attrs["mode"] == "mr" and attrs["targets"] == "labels"
        assert attrs["pixels"]["dims"] == 3 and len(attrs["mean"]) == len(attrs["std"]) == 1
        if n:  # a volume's voxels span the scaled range: background 0, the blob up to 255
            first = g["images"][0]
            assert first.min() == 0 and first.max() == 255 and (first > 0).mean() > 0.1
    assert total == len(SUBJECTS) and stats["size"] == [16, 16, 16]
    assert 0 < stats["mean"][0] < 1 and stats["std"][0] > 0.05


def test_labels_and_patients_follow_the_participants_table_and_no_patient_is_in_two_splits(audited, stores):
    out, _ = stores
    manifest = pd.read_csv(audited / "manifest.csv", dtype=str, keep_default_na=False).set_index("patient")
    seen = {}
    for name in pp.SPLITS:
        g = zarr.open_group(out / f"{name}.zarr", mode="r")
        classes = list(g.attrs["classes"])
        for patient, label in zip(g["patient"][:].tolist(), g["labels"][:].tolist()):
            assert patient not in seen
            seen[patient] = name
            assert classes[label] == manifest.loc[patient, "label"]
    assert set(seen) == set(manifest.index) and set(seen.values()) == set(pp.SPLITS)
    splits = pd.read_csv(out / "splits.csv", dtype=str)
    assert (splits.groupby("patient")["split"].nunique() == 1).all()


def test_info_maps_a_stored_volume_back_onto_its_file(audited, stores):
    out, _ = stores
    manifest = pd.read_csv(audited / "manifest.csv", dtype=str, keep_default_na=False).set_index("patient")
    g = zarr.open_group(out / "train.zarr", mode="r")
    infos = g["info"][:].tolist()
    for i, patient in enumerate(g["patient"][:].tolist()):
        info = json.loads(infos[i])
        original = nib.load(audited / "data" / manifest.loc[patient, "file"])
        assert info["shape"] == list(original.shape) and info["size"] == [16, 16, 16]
        # the stored foreground, as a "prediction", lands back on the file's own foreground
        back = unfit_volume((g["images"][i, 0] > 0).astype(np.uint8), info)
        truth = np.asanyarray(original.dataobj) != 0
        assert back.shape == original.shape
        dice = 2 * (back.astype(bool) & truth).sum() / (back.astype(bool).sum() + truth.sum())
        assert dice > 0.8, dice


def test_a_segmentation_stores_each_volumes_mask_and_background_without_one(audited, tmp_path, threads):
    data = tmp_path / "in"
    shutil.copytree(audited, data)
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    first = manifest["file"].iloc[0]
    img = nib.load(data / "data" / first)
    lesion = (np.asanyarray(img.dataobj) > 0).astype(np.uint8)
    mask_file = first.replace("_T1w.nii.gz", "_mask.nii.gz")
    nib.save(nib.Nifti1Image(lesion, img.affine), data / "data" / mask_file)
    manifest["mask"] = [mask_file] + [""] * (len(manifest) - 1)
    manifest.to_csv(data / "manifest.csv", index=False)
    pp.preprocess(data, tmp_path / "out", PARAMS, seed=0, task="segmentation")
    found = 0
    for name in pp.SPLITS:
        g = zarr.open_group(tmp_path / "out" / f"{name}.zarr", mode="r")
        n = g["images"].shape[0]
        assert g["masks"].shape == (n, 16, 16, 16) and g["masks"].chunks == (1, 16, 16, 16)
        assert g.attrs["targets"] == "masks"
        for i, patient in enumerate(g["patient"][:].tolist()):
            fg = g["masks"][i] > 0
            assert g["labels"][i] == int(fg.any())
            if patient == manifest["patient"].iloc[0]:
                found += 1  # the mask follows its image (nearest inside the bilinear image's blurred edge)
                image_fg = g["images"][i, 0] > 0
                assert not (fg & ~image_fg).any() and 2 * (fg & image_fg).sum() / (fg.sum() + image_fg.sum()) > 0.85
            else:
                assert not fg.any()
    assert found == 1


def test_a_volume_that_cannot_be_read_stops_the_stage_naming_the_file_and_the_fix(audited, tmp_path, threads):
    data = tmp_path / "in"
    shutil.copytree(audited, data)
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    bad = data / "data" / manifest["file"].iloc[3]
    bad.write_bytes(bad.read_bytes()[:400])  # the header reads, the voxels are cut off
    with pytest.raises(pp.DecodeError, match="remove it from the source") as e:
        pp.preprocess(data, tmp_path / "out", PARAMS, seed=0)
    assert str(bad) in str(e.value)


def test_volume_settings_that_cannot_apply_are_refused_with_the_fix(audited, tmp_path):
    with pytest.raises(ValueError, match="slab: 0"):
        pp.preprocess(audited, tmp_path, {**PARAMS, "slab": 1}, seed=0)
    with pytest.raises(ValueError, match="dims: 3"):
        pp.preprocess(audited, tmp_path, {"size": [16, 16, 16]}, seed=0)
    data = tmp_path / "in"
    shutil.copytree(audited, data)
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.loc[0, "kind"] = "image"
    manifest.to_csv(data / "manifest.csv", index=False)
    with pytest.raises(ValueError, match="kind image: set preprocess.dims: 2"):
        pp.preprocess(data, tmp_path / "out", PARAMS, seed=0)
    # a CT volume: one channel per HU window, as for slices
    windows = [{"center": 40, "width": 80}, {"center": 600, "width": 2800}]
    assert pp.channels(pp.complete({**PARAMS, "mode": "ct", "windows": windows})) == 2
