"""Demo data: digits in class folders, and a DICOM brain-CT project with PHI and a learnable blob."""

from __future__ import annotations

import csv
import datetime as dt
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from haven import demo


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "digits"
    return out, demo.make_digits(out)


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "brain-ct"
    return out, demo.make_brain_ct(out, n_patients=60)  # half the default: the counts below are for 60


def _series(root: Path) -> dict[str, list[pydicom.Dataset]]:
    """PatientID folder -> datasets of its slices, in InstanceNumber order (not the series' seg.dcm)."""
    out = {}
    for pdir in sorted(p for p in (root / "dicom").iterdir() if p.is_dir()):
        files = sorted((f for f in pdir.rglob("*.dcm") if f.stem.isdigit()), key=lambda f: int(f.stem))
        out[pdir.name] = [pydicom.dcmread(f) for f in files]
    return out


def _labels(root: Path) -> dict[str, str]:
    with open(root / "labels.csv", newline="") as fh:
        return {r["accession"]: r["label"] for r in csv.DictReader(fh)}


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_class_folders_and_counts(digits):
    from sklearn.datasets import load_digits

    out, summary = digits
    expected = np.bincount(load_digits().target, minlength=10)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [str(i) for i in range(10)]
    for cls in range(10):
        good = [p for p in (out / str(cls)).glob("*.png") if p.name != "corrupt.png"]
        assert len(good) == expected[cls]
    assert summary["images"] == 1797 == sum(summary["per_class"].values())
    assert summary["classes"] == 10


def test_digits_pixels_are_scaled_8bit_gray(digits):
    from sklearn.datasets import load_digits

    out, _ = digits
    d = load_digits()
    for i in (0, 100, 1796):
        with Image.open(out / str(d.target[i]) / f"{i:04d}.png") as im:
            assert im.mode == "L" and im.size == (8, 8)
            a = np.asarray(im)
        np.testing.assert_array_equal(a, np.rint(d.images[i] * 255 / 16).astype(np.uint8))
    full_ink = int(np.argmax(d.images.max(axis=(1, 2)) == 16))  # a digit with value 16 -> 255
    with Image.open(out / str(d.target[full_ink]) / f"{full_ink:04d}.png") as im:
        assert np.asarray(im).max() == 255


def test_digits_plants_exactly_one_corrupt_png(digits):
    out, _ = digits
    bad = []
    for p in sorted(out.rglob("*.png")):
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception:
            bad.append(p.relative_to(out).as_posix())
    assert bad == ["3/corrupt.png"]
    assert not (out / "README.txt").exists()


def test_digits_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    demo.make_digits(a, seed=1)
    demo.make_digits(b, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ---------------------------------------------------------------------------------------------
# brain CT: files and headers


def test_brain_ct_layout_and_dicom_validity(brain):
    out, summary = brain
    series = _series(out)
    assert len(series) == 60 and summary["patients"] == 60 and summary["slices"] == 240
    for pid, slices in series.items():
        assert len(slices) == 4
        for k, ds in enumerate(slices):
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.preamble is not None
            assert ds.PatientID == pid  # folder named after the (identifying) PatientID
            assert ds.InstanceNumber == k + 1
            assert ds.Modality == "CT" and (ds.Rows, ds.Columns) == (512, 512)
            assert ds.PixelRepresentation == 0 and ds.BitsAllocated == 16
            assert ds.pixel_array.dtype == np.uint16
            assert float(ds.ImagePositionPatient[2]) == float(ds.SliceLocation)
    # two of the slices only, decoded against the header's rescale
    ds = series[next(iter(series))][0]
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    assert hu.min() >= -1024 and 1000 < hu.max() <= 3071  # air .. bone


def test_brain_ct_uids(brain):
    out, _ = brain
    series = _series(out)
    sops, studies = set(), set()
    for slices in series.values():
        assert len({ds.StudyInstanceUID for ds in slices}) == 1
        assert len({ds.SeriesInstanceUID for ds in slices}) == 1
        assert len({ds.FrameOfReferenceUID for ds in slices}) == 1
        studies.add(slices[0].StudyInstanceUID)
        sops.update(ds.SOPInstanceUID for ds in slices)
        first = slices[0].SOPInstanceUID
        assert "ReferencedImageSequence" not in slices[0]
        for ds in slices[1:]:
            assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first
        req = slices[0].RequestAttributesSequence[0]
        assert req.ReferencedStudySequence[0].ReferencedSOPInstanceUID == slices[0].StudyInstanceUID
        assert req.RequestedProcedureID == slices[0].AccessionNumber
    assert len(studies) == 60 and len(sops) == 240


def test_brain_ct_phi_is_distinct_and_realistic(brain):
    out, _ = brain
    series = _series(out)
    firsts = [s[0] for s in series.values()]
    for kw in ("PatientName", "PatientID", "AccessionNumber", "OtherPatientIDs", "StudyInstanceUID"):
        assert len({str(ds.get(kw)) for ds in firsts}) == 60, kw
    for ds in firsts:
        family, given = str(ds.PatientName).split("^")[:2]
        assert given.title() in ds.ImageComments and family.title() in ds.ImageComments
        block = ds.private_block(0x0009, "HAVEN_DEMO")
        assert block[0x10].value == ds.PatientID
        assert family in block[0x11].value
        assert str(ds.RequestAttributesSequence[0].RequestingPhysician).count("^") >= 1
        assert ds.ReferringPhysicianName and ds.PerformingPhysicianName and ds.OperatorsName
        assert ds.InstitutionName and ds.InstitutionAddress and ds.StationName
        # age consistent with birth date and study date, 20-90
        birth = dt.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        study = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
        assert ds.PatientAge == f"{years:03d}Y" and 20 <= years <= 90
    assert {ds.PatientSex for ds in firsts} == {"M", "F"}
    sites = {ds.InstitutionName for ds in firsts}
    assert len(sites) == 3
    model = defaultdict(set)
    for ds in firsts:
        model[ds.InstitutionName].add(ds.ManufacturerModelName)
    assert all(len(m) == 1 for m in model.values()) and len(set().union(*model.values())) == 3


def test_brain_ct_labels_balanced_and_not_confounded(brain):
    out, summary = brain
    labels = _labels(out)
    series = _series(out)
    firsts = [s[0] for s in series.values()]
    assert set(labels) == {ds.AccessionNumber for ds in firsts}
    assert sorted(labels.values()).count("hemorrhage") == 30 == sorted(labels.values()).count("normal")
    assert summary["hemorrhage"] == 30
    for attr in ("InstitutionName", "PatientSex"):
        by_group = defaultdict(set)
        for ds in firsts:
            by_group[str(ds.get(attr))].add(labels[ds.AccessionNumber])
        assert all(v == {"hemorrhage", "normal"} for v in by_group.values()), attr


def test_brain_ct_label_table_has_the_rsna_layout(brain):
    """``label`` as before; one 0/1 column per subtype and ``any`` = hemorrhage; 1-2 subtypes each."""
    from haven.demolesions import SUBTYPES

    out, summary = brain
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["accession", "patient", "label", *SUBTYPES, "any"]
    ids = {s[0].AccessionNumber: s[0].PatientID for s in _series(out).values()}
    for r in rows:
        flags = [int(r[s]) for s in SUBTYPES]
        assert r["patient"] == ids[r["accession"]]
        assert int(r["any"]) == (r["label"] == "hemorrhage") == (sum(flags) > 0)
        assert sum(flags) <= 2
    per_subtype = {s: sum(int(r[s]) for r in rows) for s in SUBTYPES}
    assert per_subtype == summary["subtypes"] and min(per_subtype.values()) >= 5  # every subtype learnable


def test_brain_ct_blob_is_visible(brain):
    """The hemorrhage is ~65-85 HU inside the brain and survives 512->64 downsampling in W80/L40."""
    out, _ = brain
    labels = _labels(out)
    series = _series(out)
    with open(out / "labels.csv", newline="") as fh:
        n_subtypes = {r["accession"]: sum(r[k] == "1" for k in list(r)[3:-1]) for r in csv.DictReader(fh)}
    with open(out / "lesions.csv", newline="") as fh:
        lesions = list(csv.DictReader(fh))
    positives = {a for a, v in labels.items() if v == "hemorrhage"}
    assert {r["accession"] for r in lesions} == positives
    assert len(lesions) == 4 * sum(n_subtypes.values())  # every lesion on every slice of its patient
    assert all(int(r["area_px"]) >= 150 for r in lesions)  # >= 2-3 pixels at 64 px, even a thin rim
    blobs = [r for r in lesions if r["subtype"] == "intraparenchymal"]
    by_acc = {s[0].AccessionNumber: s for s in series.values()}
    negative = next(s for a, s in by_acc.items() if labels[a] == "normal")
    yy, xx = np.mgrid[0:512, 0:512]
    for r in blobs:
        k = int(r["instance"]) - 1
        ds = by_acc[r["accession"]][k]
        a, b = float(r["semi_axis_a"]), float(r["semi_axis_b"])
        assert 10 <= b <= a <= 40
        th = np.deg2rad(float(r["angle_deg"]))
        dy, dx = yy - float(r["row"]), xx - float(r["col"])
        u = (dy * np.cos(th) + dx * np.sin(th)) / a
        v = (-dy * np.sin(th) + dx * np.cos(th)) / b
        core = u * u + v * v <= 0.5**2
        hu_pos = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
        neg = negative[k]
        hu_neg = pydicom.pixels.apply_modality_lut(neg.pixel_array, neg)
        assert 55 <= hu_pos[core].mean() <= 100
        assert hu_pos[core].mean() > np.median(hu_neg[(hu_neg > 20) & (hu_neg < 50)]) + 20  # above brain
    # downsampled brain window: the blob's 8x8 block is near white, clearly above the brain around it
    r = max(blobs, key=lambda r: float(r["semi_axis_b"]))
    ds = by_acc[r["accession"]][int(r["instance"]) - 1]
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    win = np.clip((hu - 0.0) / 80.0, 0, 1)
    small = win.reshape(64, 8, 64, 8).mean(axis=(1, 3))
    cy, cx = int(float(r["row"]) // 8), int(float(r["col"]) // 8)
    assert small[cy, cx] > 0.75
    brain_gray = np.median(win[(hu > 20) & (hu < 50)])
    assert small[cy, cx] - brain_gray > 0.25


def test_brain_ct_subtypes_have_their_own_shape_and_place():
    """Epidural/subdural hug the skull (the subdural thinner and longer), intraparenchymal sits deep,
    intraventricular on the ventricle, subarachnoid on the brain's surface; all at blood density."""
    from scipy import ndimage as ndi

    from haven import demolesions as dl

    base, _ = demo.base_slice()
    m = dl.anatomy(base)
    vy, vx = dl.VENTRICLE_RC
    for seed in range(4):
        drawn = {s: (dl.SHAPES[s](m, base.shape, np.random.default_rng(seed)) > 0.5) for s in dl.SUBTYPES}
        for s, mask in drawn.items():
            assert mask.sum() >= 150, s
        bone = {s: m["bone_dist"][mask] for s, mask in drawn.items()}
        assert np.median(bone["epidural"]) < 14 and np.median(bone["subdural"]) < 10
        assert np.median(bone["intraparenchymal"]) > 20
        assert np.median(m["brain_dist"][drawn["subarachnoid"]]) <= 3
        rows, cols = np.nonzero(drawn["intraventricular"])
        assert np.hypot(rows.mean() - vy, cols.mean() - vx) < 8
        # thickness: the largest inscribed disc; the epidural lens is thicker than the subdural rim
        thick = {s: ndi.distance_transform_edt(drawn[s]).max() for s in ("epidural", "subdural")}
        assert thick["epidural"] > thick["subdural"]
        lesion = {"subtype": "epidural", "weight": drawn["epidural"].astype(np.float32), "hu": 75.0}
        after = base + dl.blood_delta(base, [lesion])
        assert np.all(np.abs(after[drawn["epidural"] & (base < 100)] - 75.0) < 1e-3)
        assert np.array_equal(after[base >= 100], base[base >= 100])  # bone is never painted


def test_brain_ct_seg_exactly_for_the_lesion_series(brain):
    """One seg.dcm beside the slices of every hemorrhage series, none for a normal one."""
    out, summary = brain
    labels = _labels(out)
    with_seg = {}
    for series_dir in {f.parent for f in (out / "dicom").rglob("1.dcm")}:
        accession = series_dir.name.split("_", 1)[1]
        with_seg[accession] = (series_dir / "seg.dcm").exists()
        assert sorted(f.name for f in series_dir.iterdir() if f.name != "seg.dcm") == [f"{k}.dcm" for k in range(1, 5)]
    assert with_seg == {a: v == "hemorrhage" for a, v in labels.items()}
    assert summary["segmentations"] == 30 == sum(with_seg.values())
    assert len(list((out / "dicom").rglob("seg.dcm"))) == 30


def _seg_and_slices(out: Path):
    """(segread SEG, the series' CT datasets) for every series with a seg.dcm."""
    import highdicom as hd

    for seg_path in sorted((out / "dicom").rglob("seg.dcm")):
        files = sorted((f for f in seg_path.parent.glob("*.dcm") if f.stem.isdigit()), key=lambda f: int(f.stem))
        yield hd.seg.segread(seg_path), [pydicom.dcmread(f) for f in files]


def test_brain_ct_seg_references_its_series_and_carries_its_phi(brain):
    """A standard BINARY SEG, segment 1 "lesion", referencing exactly the series' slices and copying
    the patient/study identifiers (the de-identification must meet them there too)."""
    out, _ = brain
    n = 0
    for seg, slices in _seg_and_slices(out):
        ds = slices[0]
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" == seg.file_meta.MediaStorageSOPClassUID
        assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
        assert seg.number_of_segments == 1 and seg.get_segment_description(1).segment_label == "lesion"
        refs = seg.get_source_image_uids()
        assert {r[2] for r in refs} == {d.SOPInstanceUID for d in slices}
        assert {(r[0], r[1]) for r in refs} == {(ds.StudyInstanceUID, ds.SeriesInstanceUID)}
        assert seg.SeriesInstanceUID != ds.SeriesInstanceUID and seg.StudyInstanceUID == ds.StudyInstanceUID
        assert seg.FrameOfReferenceUID == ds.FrameOfReferenceUID
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate"):
            assert str(seg.get(kw)) == str(ds.get(kw)), kw
        n += 1
    assert n == 30


def test_brain_ct_seg_lies_on_the_blood(brain):
    """Inside the mask the stored slice is acute blood (55-100 HU), well above the brain around it."""
    from scipy import ndimage as ndi

    out, _ = brain
    for seg, slices in _seg_and_slices(out):
        uids = [d.SOPInstanceUID for d in slices]
        frames = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0].astype(bool)
        assert frames.shape == (4, 512, 512) and all(f.sum() >= 150 for f in frames)
        for ds, mask in zip(slices, frames):
            hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
            ring = ndi.binary_dilation(mask, iterations=8) & ~ndi.binary_dilation(mask, iterations=3)
            brain = ring & (hu > 0) & (hu < 55)
            assert 55 <= hu[mask].mean() <= 100
            assert hu[mask].mean() - np.median(hu[brain]) > 20


def test_brain_ct_seg_frames_are_the_drawn_masks(tmp_path, monkeypatch):
    """The SEG holds, per slice, exactly the mask the generator drew (read back by SOP UID), and
    that mask moves with each slice's shift (its centre is the lesion's in lesions.csv)."""
    from haven import demolesions

    drawn = {}
    real = demolesions.segmentation

    def spy(sources, masks, uids):
        drawn.update({d.SOPInstanceUID: m.copy() for d, m in zip(sources, masks)})
        return real(sources, masks, uids)

    monkeypatch.setattr(demolesions, "segmentation", spy)
    out = tmp_path / "b"
    demo.make_brain_ct(out, n_patients=6, slices=3, seed=5)
    with open(out / "lesions.csv", newline="") as fh:
        centre = {(r["accession"], int(r["instance"])): (float(r["row"]), float(r["col"]))
                  for r in csv.DictReader(fh)}  # the last lesion's; each slice moves all of them alike
    seen = 0
    for seg, slices in _seg_and_slices(out):
        uids = [d.SOPInstanceUID for d in slices]
        frames = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0].astype(bool)
        acc = slices[0].AccessionNumber
        for ds, frame in zip(slices, frames):
            np.testing.assert_array_equal(frame, drawn[ds.SOPInstanceUID])
            seen += 1
            # slice k's mask is slice 1's moved by the shift lesions.csv records between them
            shift = [round(a - b) for a, b in zip(centre[acc, ds.InstanceNumber], centre[acc, 1])]
            np.testing.assert_array_equal(frame, np.roll(frames[0], shift, axis=(0, 1)))
        assert len({f.tobytes() for f in frames}) > 1  # the slices did move (else the check above is empty)
    assert seen == len(drawn) == 3 * 3  # three hemorrhage patients, three slices each


def test_lesion_mask_is_where_blood_outweighs_tissue():
    """The mask takes a pixel iff the blend made it more blood than tissue, and never bone."""
    from haven import demolesions as dl

    base, _ = demo.base_slice()
    m = dl.anatomy(base)
    les = [{"subtype": "subdural", "weight": dl.subdural(m, base.shape, np.random.default_rng(1)), "hu": 75.0}]
    mask = dl.lesion_mask(base, les)
    far = np.abs(75.0 - base) > 5  # where the blood fraction can be read back from the blend
    frac = np.where(far, dl.blood_delta(base, les) / np.where(far, 75.0 - base, 1.0), np.nan)
    painted = (les[0]["weight"] > 0) & (base < 100) & far
    assert mask.sum() >= 150 and not mask[base >= 100].any()
    assert np.all(frac[mask & far] > 0.5 - 1e-4) and np.all(frac[painted & ~mask] <= 0.5 + 1e-4)
    assert (painted & ~mask).sum() > 50  # the soft edge exists and is left out
    assert dl.lesion_mask(base, []).sum() == 0


def test_brain_ct_planted_bad_files(brain):
    out, summary = brain
    trunc, notes = out / "dicom" / "truncated.dcm", out / "dicom" / "notes.dcm"
    assert len(trunc.read_bytes()) == 300 and trunc.read_bytes()[128:132] == b"DICM"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(notes)
    assert summary["bad_files"] == 2


def test_brain_ct_deterministic_and_seeded(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(_make(tmp_path / "a", seed=3))
    b = files(_make(tmp_path / "b", seed=3))
    c = files(_make(tmp_path / "c", seed=4))
    assert a == b  # the SEGs too: no "now" timestamps, no random UIDs
    assert a != c
    segs = [k for k in a if k.endswith("/seg.dcm")]
    assert len(segs) == 2  # the two hemorrhage patients of four
    assert sum(k.endswith(".dcm") for k in a) == 4 * 2 + 2 + len(segs)


def _make(out, seed):
    demo.make_brain_ct(out, n_patients=4, slices=2, seed=seed)
    return out


def test_demo_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("do not delete")
    with pytest.raises(ValueError, match="not written by `haven demo`"):
        demo.make_brain_ct(tmp_path / "mine", n_patients=2, slices=1)
    assert (tmp_path / "mine" / "precious.txt").exists()
    # a folder the demo wrote is replaced cleanly (no stale patients)
    out = _make(tmp_path / "again", seed=0)
    demo.make_brain_ct(out, n_patients=2, slices=1, seed=0)
    assert len([p for p in (out / "dicom").iterdir() if p.is_dir()]) == 2
    assert not list(tmp_path.glob(".again*"))  # no temporary folders left behind


# ---------------------------------------------------------------------------------------------
# new patients for the predict DAG (haven.demonew): unlabeled, held back, PHI planted


def _gate_unlabeled(src: Path, work: Path) -> dict:
    """Ingest (unlabeled, as the DAG ingests a predict source), anonymize and audit ``src``."""
    from haven import keys
    from haven.deid.anonymize import anonymize
    from haven.deid.audit import gate
    from haven.ingest import Tables, ingest

    key = keys.load_key(keys.create_key(work / "key"))
    tables = Tables.in_folder(work / "phi")
    (work / "phi").mkdir(parents=True)
    got = ingest(src, tables, labels_required=False, label_folders=False)
    out = work / "out"
    out.mkdir()
    done = anonymize(src, tables.manifest, key, data=out / "data", manifest=out / "manifest.csv",
                     log_csv=out / "log.csv", quarantine=out / "quarantine.csv")
    result, _ = gate([out / "data"], out / "manifest.csv", out / "log.csv", tables.identifiers, tables.manifest,
                     out / "audit.json", key=key)
    return {"files": got["files"], "anonymized": done["anonymized"], "passed": result["passed"],
            "findings": result["findings"], "out": out}


def test_digits_new_is_a_flat_unlabeled_hospital_export_of_new_images(tmp_path):
    import re
    import time

    from sklearn.datasets import load_digits

    from haven import demonew

    t0 = time.perf_counter()
    summary = demonew.make_digits_new(tmp_path / "new")
    assert time.perf_counter() - t0 < 5
    files = sorted((tmp_path / "new").glob("*.png"))
    assert len(files) == 60 == summary["images"]
    assert not [p for p in (tmp_path / "new").iterdir() if p.is_dir()]  # no class folders, no label table
    assert not list((tmp_path / "new").glob("*.csv"))
    assert all(re.fullmatch(r"PAT\d{6}_20\d{6}\.png", p.name) for p in files)
    assert len({p.name.split("_")[0] for p in files}) == 60  # one patient each
    train = np.rint(load_digits().images * 255 / 16).astype(np.uint8).reshape(1797, -1)
    texts = 0
    for p in files:
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (8, 8)
            a = np.asarray(im).reshape(-1)
            texts += "Comment" in im.text and "MRN" in im.text["Comment"]
        assert not (train == a).all(axis=1).any(), p.name  # not a copy of a training image
    assert texts == summary["with_text_chunk"] == 20
    assert sum(summary["per_class"].values()) == 60 and len([v for v in summary["per_class"].values() if v]) >= 8


def test_digits_new_passes_the_gate_and_loses_its_identifiers(tmp_path):
    from haven import demonew

    demonew.make_digits_new(tmp_path / "new")
    got = _gate_unlabeled(tmp_path / "new", tmp_path / "gate")
    assert got["files"] == got["anonymized"] == 60 and got["passed"] and not got["findings"]
    written = (got["out"] / "manifest.csv").read_text() + "".join(p.name for p in (got["out"] / "data").rglob("*"))
    for p in (tmp_path / "new").glob("*.png"):
        assert p.stem not in written and p.stem.split("_")[0] not in written
    for p in (got["out"] / "data").rglob("*.png"):
        with Image.open(p) as im:
            assert not im.text  # the text chunk with the name and MRN is gone


def test_brain_ct_new_patients_are_not_the_training_demos(brain, tmp_path):
    import time

    from haven import demonew

    t0 = time.perf_counter()
    summary = demonew.make_brain_ct_new(tmp_path / "new")
    assert time.perf_counter() - t0 < 5
    assert summary["patients"] == 12 and summary["slices"] == 48
    assert summary["hemorrhage"] == 6 == summary["normal"]  # a mix for the predictions to show
    assert sorted(p.name for p in (tmp_path / "new").iterdir() if not p.name.startswith(".")) == ["dicom"]
    new = _series(tmp_path / "new")
    old = _series(brain[0])
    assert len(new) == 12 and all(len(s) == 4 for s in new.values())
    for kw in ("PatientID", "AccessionNumber", "OtherPatientIDs", "StudyInstanceUID"):
        a = {str(s[0].get(kw)) for s in new.values()}
        assert len(a) == 12 and not a & {str(s[0].get(kw)) for s in old.values()}, kw
    assert not {d.SOPInstanceUID for s in new.values() for d in s} & {d.SOPInstanceUID for s in old.values() for d in s}
    for slices in new.values():  # PHI where the training demo plants it
        ds = slices[0]
        assert ds.private_block(0x0009, "HAVEN_DEMO")[0x10].value == ds.PatientID
        assert str(ds.PatientName).split("^")[0].title() in ds.ImageComments
        assert ds.PatientBirthDate and ds.InstitutionName and ds.ReferringPhysicianName


def test_brain_ct_new_passes_the_gate_and_is_deterministic(tmp_path):
    from haven import demonew

    demonew.make_brain_ct_new(tmp_path / "a", n_patients=4, slices=2)
    demonew.make_brain_ct_new(tmp_path / "b", n_patients=4, slices=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.dcm"))
    assert len(files) == 8
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    got = _gate_unlabeled(tmp_path / "a" / "dicom", tmp_path / "gate")
    assert got["files"] == got["anonymized"] == 8 and got["passed"] and not got["findings"]


def test_haven_demo_writes_the_new_sets(tmp_path):
    from haven.cli import main

    assert main(["demo", "digits-new", str(tmp_path / "d")]) == 0
    assert main(["demo", "brain-ct-new", str(tmp_path / "b")]) == 0
    assert len(list((tmp_path / "d").glob("PAT*.png"))) == 60
    assert len(list((tmp_path / "b" / "dicom").rglob("*.dcm"))) == 48
