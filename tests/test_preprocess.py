import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from haven.learn import preprocess as pp
from haven.sources.dicom import decode_dicom


def _manifest(n_patients=30, per_patient=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "a" if p % 3 else "b"
        for i in range(per_patient):
            rows.append({"file": f"{p}_{i}.png", "patient": f"P{p:03d}", "label": label, "kind": "image"})
    return pd.DataFrame(rows).sample(frac=1, random_state=int(rng.integers(1000)))


def test_patient_level_split_has_no_overlap_and_is_stratified():
    m = _manifest()
    split = pp.split_patients(m, val=0.15, test=0.2, seed=1)
    m["split"] = m["patient"].map(split)
    per_patient = m.groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    assert set(m["split"]) == {"train", "val", "test"}
    for name in ("val", "test"):
        assert set(m.loc[m["split"] == name, "label"]) == {"a", "b"}  # both classes present
    # seeded: same split again, different with another seed
    assert split.equals(pp.split_patients(m, val=0.15, test=0.2, seed=1))
    assert not split.equals(pp.split_patients(m, val=0.15, test=0.2, seed=2))


def _ct(path, hu_values):
    """A CT file whose stored values map to the given HU with slope 1, intercept -1024."""
    arr = (np.asarray(hu_values, dtype=np.int32) + 1024).astype(np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_ct_windowing_on_known_hounsfield_values(tmp_path):
    hu = np.array([[-1000, 0, 40, 80], [1000, 3000, 20, 60]] * 2)
    path = _ct(tmp_path / "ct.dcm", hu)
    out = decode_dicom(path, "ct", [{"center": 40, "width": 80}, {"center": 600, "width": 2800}])
    brain, bone = out
    # brain window W80/L40 spans 0..80 HU
    assert brain[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])
    assert brain[1].tolist() == pytest.approx([1.0, 1.0, 0.25, 0.75])
    # bone window W2800/L600 spans -800..2000 HU
    assert bone[0, 1] == pytest.approx(800 / 2800)
    assert bone[1, 0] == pytest.approx(1800 / 2800)
    assert bone[1, 1] == 1.0 and bone[0, 0] == 0.0


def test_preprocess_refuses_unaudited_data(tmp_path):
    (tmp_path / "manifest.csv").write_text("file,kind,patient,label\n")
    with pytest.raises(pp.AuditGateError, match="audit"):
        pp.preprocess(tmp_path, tmp_path / "out", {}, seed=0)
    (tmp_path / "audit.json").write_text(json.dumps({"passed": False}))
    with pytest.raises(pp.AuditGateError, match="failed"):
        pp.preprocess(tmp_path, tmp_path / "out", {}, seed=0)


def test_preprocess_writes_zarr_shards(tmp_path):
    from PIL import Image
    import zarr

    anon = tmp_path / "anon"
    (anon / "data").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for p in range(20):
        label = "dark" if p % 2 else "bright"
        for i in range(2):
            name = f"{p}_{i}.png"
            base = 40 if label == "dark" else 200
            Image.fromarray((base + rng.integers(0, 30, (12, 10))).astype(np.uint8)).save(anon / "data" / name)
            rows.append({"file": name, "kind": "image", "patient": f"P{p}", "study": "", "series": "",
                         "label": label, "sex": "F", "age_band": "40-49", "site": "S1", "modality": ""})
    pd.DataFrame(rows).to_csv(anon / "manifest.csv", index=False)
    (anon / "audit.json").write_text(json.dumps({"passed": True}))
    params = {"size": 16, "mode": "gray", "windows": [], "split": {"val": 0.2, "test": 0.2}, "chunk": 4, "workers": 1}
    stats = pp.preprocess(anon, tmp_path / "pre", params, seed=0)
    assert sum(stats["samples"].values()) == 40
    assert stats["classes"] == ["bright", "dark"]
    g = zarr.open_group(tmp_path / "pre" / "train.zarr", mode="r")
    assert g["images"].shape[1:] == (1, 16, 16)
    assert g["images"].chunks[0] == 4
    assert g["images"].dtype == np.uint8
    labels = g["labels"][:]
    imgs = g["images"][:]
    # the stored pixels follow the labels: bright images are bright
    assert imgs[labels == 0].mean() > imgs[labels == 1].mean() + 100
    splits = pd.read_csv(tmp_path / "pre" / "splits.csv")
    assert splits.groupby("patient")["split"].nunique().max() == 1
    # normalization statistics come from the train split only
    train_mean = imgs.astype(np.float64).mean() / 255
    assert stats["mean"][0] == pytest.approx(train_mean, rel=1e-6)
    assert dict(g.attrs)["mean"] == stats["mean"]


def test_slab_stacks_neighbouring_slices_in_z_order(tmp_path):
    """2.5D: each slice carries its neighbours along z (not file or manifest order), the series'
    ends repeat the edge slice, and slices of another series never mix in."""
    import zarr

    anon = tmp_path / "anon"
    (anon / "data").mkdir(parents=True)
    rows = []
    # per series 4 slices with constant HU 0, 20, 40, 60 at z = 30, 10, 20, 0 (so z order = 60, 20, 40, 0)
    for p in range(12):
        for i, (hu, z) in enumerate(zip((0, 20, 40, 60), (30.0, 10.0, 20.0, 0.0))):
            name = f"s{p}_{i}.dcm"
            path = _ct(anon / "data" / name, np.full((8, 8), hu + (100 if p % 2 else 0)))
            ds = pydicom.dcmread(path)
            ds.ImagePositionPatient = [0, 0, z]
            ds.InstanceNumber = 9 - i
            ds.save_as(path)
            rows.append({"file": name, "kind": "dicom", "patient": f"P{p}", "study": f"1.{p}", "series": f"2.{p}",
                         "label": "hi" if p % 2 else "lo", "sex": "", "age_band": "", "site": "", "modality": "CT"})
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(anon / "manifest.csv", index=False)
    (anon / "audit.json").write_text(json.dumps({"passed": True}))
    params = {"size": 8, "mode": "ct", "windows": [{"center": 100, "width": 400}], "slab": 1,
              "split": {"val": 0.2, "test": 0.2}, "chunk": 4, "workers": 1}
    stats = pp.preprocess(anon, tmp_path / "pre", params, seed=0)
    assert stats["channels"] == 3
    splits = pd.read_csv(tmp_path / "pre" / "splits.csv")
    for split in ("train", "val", "test"):
        g = zarr.open_group(tmp_path / "pre" / f"{split}.zarr", mode="r")
        assert g["images"].shape[1:] == (3, 8, 8) and g.attrs["slab"] == 1
        files = splits.loc[splits["split"] == split, "file"].tolist()
        for img, f in zip(g["images"][:], files):
            p, i = (int(v) for v in f[1:-4].split("_"))
            offset = 100 if p % 2 else 0
            z_order = [60, 20, 40, 0]  # HU of the slices sorted by z
            at = z_order.index((0, 20, 40, 60)[i])
            want = [z_order[max(at - 1, 0)], z_order[at], z_order[min(at + 1, 3)]]
            hu = img.mean(axis=(1, 2)) / 255 * 400 - 100  # back through the window
            assert hu.tolist() == pytest.approx([w + offset for w in want], abs=1.0), f
