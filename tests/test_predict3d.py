"""The predict stage with a 3D model, for real: NIfTI volumes (a BIDS dataset and a plain folder,
LPS and RAS, different shapes and spacings, planted identifiers in their headers) de-identified
and audited by the pipeline's own gate, fitted as training fits them, scored, and for a
segmentation a mask per volume written back onto the file's own grid.

The models: a tiny MONAI DenseNet (seeded weights) for classification, a tiny U-Net (seeded) for
the sliding-window plumbing, and for the mask's geometry the U-Net swapped for a function that
marks bright voxels, so that the mask on the original grid can be checked against the bright
voxels of the original file (the ground truth, not the tables under test)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundles import ct_bundle, ct_files  # noqa: E402

from haven import keys  # noqa: E402
from haven.learn.preprocess import Inputs  # noqa: E402
from haven.predict.bundle import Bundle  # noqa: E402

# MONAI's LoadImage sets up its DICOM reader too, and says so on a machine without nvImageCodec
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
SIDE = 16
SPACING = [3.0, 3.0, 3.0]
# (shape, signed voxel sizes: negative x and y is LPS-like, as a DICOM converter may write)
VOLUMES = [((20, 24, 22), (-2.0, -2.0, 2.5)), ((26, 22, 20), (2.0, 2.0, 2.0)), ((22, 20, 26), (2.5, -2.0, 2.0))]
PIXELS = {"size": SIDE, "mode": "mr", "windows": [], "slab": 0, "dims": 3, "spacing": SPACING}


def _volume(shape, zooms, rng):
    """A head-like ellipsoid (values ~300, zero around: skull-stripped) with a bright lesion (800)
    off its centre, and the lesion's voxels (the truth a bright-voxel model must find)."""
    grid = np.meshgrid(*[(np.arange(n) - n * 0.5) * abs(z) for n, z in zip(shape, zooms)], indexing="ij")
    head = sum((g / r) ** 2 for g, r in zip(grid, (19.0, 18.0, 17.0))) <= 1
    lesion = sum(((g - c) / 6.0) ** 2 for g, c in zip(grid, (5.0, -4.0, 3.0))) <= 1
    data = np.where(head, 300 + rng.normal(0, 20, shape), 0)
    return np.where(lesion, 800.0, data).astype(np.int16), lesion & head


def _write(path: Path, data, zooms, name: str):
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-z * n / 2 for z, n in zip(zooms, data.shape)]
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = f"{name} 2024-03-01".encode()  # an identifier the gate must remove
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _sources(root: Path):
    """A BIDS dataset (two subjects) and a plain folder (one volume, one DICOM slice)."""
    rng = np.random.default_rng(0)
    bids, plain, truth = root / "bids", root / "plain", {}
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    (bids / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    for i, (shape, zooms) in enumerate(VOLUMES):
        data, lesion = _volume(shape, zooms, rng)
        path = bids / f"sub-0{i + 1}" / "anat" / f"sub-0{i + 1}_T1w.nii.gz" if i < 2 else plain / "scan.nii.gz"
        _write(path, data, zooms, f"Doe^Jane{i}")
        truth[shape] = (data, lesion)
    ct_files(plain / "dicom", 1)  # a 2-D file among the volumes: a 3D model names it and the fix
    return bids, plain, truth


def _model_pt(path: Path, task: str, classes: list[str], patch, mean=0.2, std=0.25) -> Path:
    from haven.learn.tasks import get_task

    options = {"classes": classes} if task == "segmentation" else {}
    backbone = "unet_tiny" if task == "segmentation" else "densenet_tiny"
    torch.manual_seed(0)
    model = get_task(task, options).network(backbone, len(classes), None, 1, dims=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "backbone": backbone, "classes": classes, "in_chans": 1,
                "size": [SIDE] * 3, "mean": [mean], "std": [std], "hparams": {}, "best_epoch": 1, "task": task,
                "task_options": options, "pixels": PIXELS, "dims": 3, "spacing": SPACING, "patch": patch}, path)
    return path


class BrightVoxels(nn.Module):
    """Segmentation logits that mark the voxels scaled above 0.5 (the lesion, not the head)."""

    def forward(self, x):
        fg = 40.0 * (x[:, :1] - 0.5)
        return torch.cat([-fg, fg], 1)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    from haven.deid.oneshot import deidentify

    tmp = tmp_path_factory.mktemp("predict3d")
    bids, plain, truth = _sources(tmp / "export")
    key = keys.load_key(keys.create_key(tmp / "secret" / "haven.key"))
    out = {}
    for name, src in (("bids", bids), ("plain", plain)):
        gate = deidentify(src, tmp / name, key, work=tmp / f"phi-{name}", label_folders=False,
                          options={"deface": {"volumes": False}})  # a synthetic blob has no face to remove
        assert gate["audit_passed"], gate
        out[name] = Inputs(Path(gate["manifest"]), Path(gate["audit"]), Path(gate["data"]))
    return {"inputs": out, "truth": truth, "tmp": tmp}


def _predict(audited, bundle, name: str, tag: str):
    from haven.predict.stage import predict

    folder = audited["tmp"] / tag
    summary = predict(audited["inputs"][name], bundle, folder / "predictions.csv", folder / "summary.json",
                      masks=folder / "masks" if bundle.task.targets == "masks" else None, batch_size=2)
    return pd.read_csv(folder / "predictions.csv", dtype=str, keep_default_na=False), summary, folder


def _original(audited, name: str, file: str):
    """The audited volume's data and affine, and the original file's truth (matched by shape)."""
    img = nib.load(str(audited["inputs"][name].data / file))
    return img, audited["truth"][tuple(img.shape)]


def test_a_3d_classifier_gives_one_row_per_volume_as_a_2d_one_does(audited, tmp_path):
    from haven.predict import volumes

    model_pt = _model_pt(tmp_path / "cls" / "train" / "model.pt", "classification", ["control", "atrophy"], None)
    _, metrics = ct_bundle(tmp_path / "ct")  # its metrics.json: temperature 1.5, threshold 0.4 on atrophy's side
    record = json.loads(metrics.read_text())
    record["classes"] = ["control", "atrophy"]
    record["decision"]["positive"] = "atrophy"
    metrics.write_text(json.dumps(record))
    bundle = Bundle.load(model_pt, metrics, name="haven-brain", version="2")
    assert bundle.dims == 3
    table, summary, _ = _predict(audited, bundle, "bids", "cls")
    assert len(table) == 2 and (table["status"] == "ok").all() and set(table["kind"]) == {"nifti"}
    for col in ("p_control", "p_atrophy", "pcal_control", "pcal_atrophy", "predicted", "input_hash"):
        assert col in table and (table[col] != "").all()
    # the row is the bundle on the volume fitted as training fits it (the store's uint8 form)
    for _, row in table.iterrows():
        sample, info = volumes.fit(bundle.meta, audited["inputs"]["bids"].data / row["file"], "nifti")
        assert sample.shape == (1, SIDE, SIDE, SIDE) and info["size"] == [SIDE] * 3
        direct = bundle.predict(sample[None])[0]
        np.testing.assert_allclose(float(row["p_atrophy"]), direct["p_atrophy"], atol=1e-6)
        assert row["input_hash"] == direct["input_hash"]
        assert row["predicted"] == ("atrophy" if direct["pcal_atrophy"] >= 0.4 else "control")
    assert table["p_atrophy"].nunique() == 2  # different volumes, different probabilities
    assert summary["predicted"] == 2 and sum(summary["per_class"].values()) == 2


def test_a_3d_segmenter_writes_each_mask_on_its_volumes_grid(audited, tmp_path):
    model_pt = _model_pt(tmp_path / "seg" / "train" / "model.pt", "segmentation", ["background", "lesion"],
                         [8, 8, 8], mean=0.0, std=1.0)
    bundle = Bundle.load(model_pt, name="haven-lesion", version="1")
    unet, _, _ = _predict(audited, bundle, "bids", "unet")  # the real U-Net through sliding windows of 8^3
    assert (unet["status"] == "ok").all() and (unet["mask_files"].str.endswith(".mask.nii.gz")).all()
    bundle.model = BrightVoxels()
    table, summary, folder = _predict(audited, bundle, "bids", "bright")
    assert len(table) == 2 and (table["status"] == "ok").all() and summary["per_class"] == {"lesion": 2}
    for _, row in table.iterrows():
        assert row["mask_files"] == row["file"][: -len(".nii.gz")] + ".mask.nii.gz"
        mask = nib.load(str(folder / "masks" / row["mask_files"]))
        img, (data, lesion) = _original(audited, "bids", row["file"])
        assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
        assert mask.get_data_dtype() == np.uint8 and mask.header.get_intent()[0] == "label"
        assert not mask.header["descrip"].item().strip(b"\0") and not mask.header.extensions  # a fresh header
        m = np.asarray(mask.dataobj)
        assert set(np.unique(m)) == {0, 1}
        # the mask back on the file's grid covers the lesion (3 mm model voxels on a 2 mm grid: its
        # edge is a voxel off at most), and little of the head around it
        dice = 2 * (m.astype(bool) & lesion).sum() / (m.sum() + lesion.sum())
        assert dice > 0.7, dice
        assert int(row["lesion_pixels"]) > 0
    # same model, same input: the same mask bytes
    again = audited["tmp"] / "again"
    _predict(audited, bundle, "bids", "again")
    first = table["mask_files"].iloc[0]
    assert (folder / "masks" / first).read_bytes() == (again / "masks" / first).read_bytes()
    shutil.rmtree(again)


def test_wrong_dimensionality_is_a_status_row_naming_the_fix(audited, tmp_path):
    # a 3D model given a folder with a DICOM slice among its volumes: the volume predicted, the slice named
    bundle = Bundle.load(_model_pt(tmp_path / "c" / "train" / "model.pt", "classification", ["a", "b"], None))
    table, summary, _ = _predict(audited, bundle, "plain", "wrong3d")
    by_kind = table.set_index("kind")
    assert by_kind.loc["nifti", "status"] == "ok" and by_kind.loc["nifti", "p_b"] != ""
    assert "2-D dicom file but the model is a 3-D volume model" in by_kind.loc["dicom", "status"]
    assert "preprocess.dims: 2" in by_kind.loc["dicom", "status"] and by_kind.loc["dicom", "p_b"] == ""
    assert summary["predicted"] == 1 and summary["not_decoded"] == 1
    # a 2D model given the same folder: the slice predicted, the volume named with the fix
    table, summary, _ = _predict(audited, Bundle.load(*ct_bundle(tmp_path / "ct")), "plain", "wrong2d")
    by_kind = table.set_index("kind")
    assert by_kind.loc["dicom", "status"] == "ok"
    status = by_kind.loc["nifti", "status"]
    assert "3-D NIfTI volume but the model was trained on 2-D" in status and "preprocess.dims: 3" in status


def test_the_registered_package_takes_a_volume_as_bytes(audited, tmp_path):
    """MLflow's pyfunc sends files as base64 bytes: a volume model reads NIfTI bytes (named or not)
    as it reads the file, and logs a NIfTI on its grid as its input example (register stopped on a
    PNG example in a brain-mri trial run)."""
    import base64

    import pandas as pd

    from haven.predict import volumes
    from haven.predict.pyfunc import samples_from_frame

    bundle = Bundle.load(_model_pt(tmp_path / "c" / "train" / "model.pt", "classification", ["a", "b"], None))
    file = next((audited["inputs"]["bids"].data).rglob("*_T1w.nii.gz"))
    data = file.read_bytes()
    expected, _ = volumes.fit(bundle.meta, file, "nifti")
    frame = pd.DataFrame({"data": [base64.b64encode(data).decode("ascii")] * 2, "filename": ["x.nii.gz", ""]})
    got = samples_from_frame(bundle, frame)
    assert got.shape == (2, *expected.shape) and np.array_equal(got[0], expected) and np.array_equal(got[1], expected)
    example = pd.DataFrame({"data": [base64.b64encode(volumes.example_volume(bundle.meta)).decode("ascii")]})
    assert samples_from_frame(bundle, example).shape == (1, *expected.shape)
    assert len(bundle.predict(samples_from_frame(bundle, example))) == 1
