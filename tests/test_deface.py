"""Defacing of 3D head volumes (PS3.15 Clean Recognizable Visual Features): the face goes, the
brain stays, a volume without a findable brain is quarantined, and the audit fails on a head
volume left with its face."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest

import headphantom
from deidrun import anonymize_into, audit_of
from haven.deid import deface
from haven.ingest import ingest
from haven.shards import shard_of

KEY = b"deface-test-key-0123456789abcdef"


def _cut(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Voxels set to the background by defacing."""
    bg = before.min()
    return (after == bg) & (before != bg)


@pytest.mark.parametrize("modality, grid", [
    ("CT", {}), ("MR", {}),
    ("CT", {"size": 112, "z": (-160.0, 110.0)}),  # taller than deep (head and neck, tight field of view)
])
def test_face_removed_brain_kept(modality, grid):
    datasets, parts = headphantom.series(modality, **grid)
    before = headphantom.stack(datasets)
    removed = deface.deface(datasets, deface.options({"enabled": True, "modalities": [modality]}))
    after = headphantom.stack(datasets)
    cut = _cut(before, after)
    assert np.array_equal(after != before, cut)  # only ever set to the background
    assert removed >= int(cut.sum()) > 0  # (voxels of the cut region already at the background count too)
    assert cut[parts["brain"]].sum() == 0  # not one brain voxel
    assert cut[parts["nose"]].mean() > 0.99
    assert cut[parts["eyes"]].mean() > 0.8
    assert cut[parts["face"]].mean() > 0.6  # the rest lies in the buffer under the brain
    assert cut[parts["skull"]].mean() < 0.02  # the vault is kept
    assert all(ds.RecognizableVisualFeatures == "NO" for ds in datasets)


def test_compressed_slices_are_decoded_and_written_uncompressed():
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    datasets, parts = headphantom.series("CT")
    before = headphantom.stack(datasets)
    for ds in datasets:
        ds.compress(RLELossless)
    deface.deface(datasets, deface.options({"enabled": True, "modalities": ["CT"]}))
    cut = _cut(before, headphantom.stack(datasets))
    assert cut[parts["nose"]].mean() > 0.99 and cut[parts["brain"]].sum() == 0
    # every slice lost voxels (the plane runs through the air in front of each): all re-encoded
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in datasets} == {ExplicitVRLittleEndian}


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_multiframe_volume_is_defaced(modality):
    datasets, parts = headphantom.series(modality)
    rng = np.random.default_rng(5)
    ds = headphantom.enhanced(datasets, order=rng.permutation(len(datasets)))  # frames in any order
    before = headphantom.frames_stack(ds)
    assert deface.slices([ds]) == len(datasets)
    assert deface.rescale(ds) == ((1.0, -1024.0) if modality == "CT" else (1.0, 0.0))
    deface.deface([ds], deface.options({"enabled": True, "modalities": [modality]}))
    cut = _cut(before, headphantom.frames_stack(ds))
    assert cut[parts["brain"]].sum() == 0
    assert cut[parts["nose"]].mean() > 0.99 and cut[parts["face"]].mean() > 0.6
    assert ds.RecognizableVisualFeatures == "NO"


def test_slices_in_any_order_give_the_same_volume():
    datasets, _ = headphantom.series("CT", z=(-110.0, 100.0))
    shuffled = list(reversed(datasets))
    vol = deface.volume(shuffled)
    assert vol.data.shape == (128, 128, len(datasets))
    assert vol.order == [(i, 0) for i in range(len(datasets))][::-1]
    # the affine maps voxel (0, 0, 0) to the first slice's position (LPS -> RAS)
    x, y, z = (float(v) for v in datasets[0].ImagePositionPatient)
    assert np.allclose(vol.affine @ [0, 0, 0, 1], [-x, -y, z, 1])


def test_gantry_tilt_gives_a_sheared_volume():
    datasets, _ = headphantom.series("CT", z=(-30.0, 30.0))
    for k, ds in enumerate(datasets):  # each slice 0.5 mm further back: a tilted gantry
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]
    vol = deface.volume(datasets)
    assert np.allclose(vol.affine[:3, 2], [0.0, -0.5, 3.0])  # RAS: posterior is -A


def test_no_brain_found_is_an_error_not_a_pass():
    datasets, _ = headphantom.series("CT")
    for ds in datasets:  # air only: nothing in it looks like a brain
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
    with pytest.raises(deface.DefaceError, match="no brain of plausible size"):
        deface.deface(datasets, deface.options({"enabled": True, "modalities": ["CT"]}))


def test_mixed_orientations_are_refused():
    datasets, _ = headphantom.series("CT", z=(-30.0, 30.0))
    datasets[3].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(deface.DefaceError, match="mixes slice orientations"):
        deface.volume(datasets)


def test_which_series_are_heads():
    opts = deface.options({"enabled": True})
    ds = pydicom.Dataset()
    ds.Modality, ds.BodyPartExamined = "MR", "BRAIN"
    assert deface.applies(ds, opts)
    ds.BodyPartExamined = "KNEE"
    assert not deface.applies(ds, opts)
    del ds.BodyPartExamined
    assert deface.applies(ds, opts)
    assert not deface.applies(ds, deface.options({"enabled": True, "missing_body_part": "skip"}))
    ds.Modality = "CT"  # head MR by default; CT only when listed
    assert not deface.applies(ds, opts)
    assert not deface.applies(ds, deface.options({}))
    with pytest.raises(ValueError, match="unknown anonymize.deface option"):
        deface.options({"enable": True})


# ---------------------------------------------------------------------------------------------
# in the anonymize stage, and its audit


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A source with a head CT volume, a two-slice head CT series and a volume that cannot be
    stacked; ingested."""
    root = tmp_path_factory.mktemp("heads")
    src = root / "src"
    volume, parts = headphantom.series("CT", seed=1)
    headphantom.write(volume, src / "volume")
    pair, _ = headphantom.series("CT", seed=2, z=(0.0, 3.0))
    for ds in pair:
        ds.PatientID = "PHANTOM-0002"
    headphantom.write(pair, src / "pair")
    broken, _ = headphantom.series("CT", seed=3, z=(-40.0, 20.0))
    for ds in broken:
        ds.PatientID = "PHANTOM-0003"
    broken[5].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    headphantom.write(broken, src / "broken")
    mr, _ = headphantom.series("MR", seed=4, body_part="BRAIN")
    for ds in mr:
        ds.PatientID = "PHANTOM-0004"
    headphantom.write([headphantom.enhanced(mr)], src / "enhanced")
    ingest(src, root / "ingest")
    return {"root": root, "src": src, "parts": parts, "volume": volume}


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_anonymize_defaces_head_volumes_and_quarantines_what_it_cannot(heads, tmp_path):
    root = heads["root"]
    out = tmp_path / "anon"
    opts = {"deface": {"enabled": True, "modalities": ["CT", "MR"]}}
    summary = anonymize_into(heads["src"], root / "ingest", out, KEY, opts)
    n_volume, n_broken = len(heads["volume"]), 21
    assert summary["inputs"] == n_volume + 2 + n_broken + 1
    assert summary["quarantined"] == n_broken
    quarantine = _rows(out / "quarantine.csv")
    assert {q["reason"] for q in quarantine} == {
        "defacing: series mixes slice orientations or sizes (a localizer among the slices?): "
        "it cannot be stacked into one volume for defacing; move the odd slices to a series of their own"}
    manifest = _rows(out / "manifest.csv")
    files = {m["file"] for m in manifest}
    on_disk = {p.relative_to(out / "data").as_posix() for p in (out / "data").rglob("*.dcm")}
    assert on_disk == files  # nothing of the quarantined series is left behind

    by_series: dict[str, list] = {}
    for m in manifest:
        by_series.setdefault(m["series"], []).append(pydicom.dcmread(out / "data" / m["file"]))
    sizes = sorted(len(v) for v in by_series.values())
    assert sizes == [1, 2, n_volume]
    for datasets in by_series.values():
        codes = {str(i.CodeValue) for i in datasets[0].DeidentificationMethodCodeSequence}
        if len(datasets) == 2:  # two slices are not a volume: left as they are
            assert "113102" not in codes and "RecognizableVisualFeatures" not in datasets[0]
            continue
        assert "113102" in codes and "113100" in codes
        assert all(ds.RecognizableVisualFeatures == "NO" for ds in datasets)
        method = list(datasets[0].DeidentificationMethod)
        assert "Clean Recognizable Visual Features Option" in method and max(map(len, method)) <= 64
        if len(datasets) == 1:  # the enhanced MR: one file of frames
            assert int(datasets[0].NumberOfFrames) > 16
            assert datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            continue
        after = headphantom.stack(datasets)
        cut = _cut(headphantom.stack(heads["volume"]), after)
        assert cut[heads["parts"]["nose"]].mean() > 0.99
        assert cut[heads["parts"]["brain"]].sum() == 0

    result = audit_of(out, root / "ingest", KEY, deface=opts["deface"])
    assert result["passed"], result["findings"][:5]


def test_audit_fails_on_a_head_volume_left_with_its_face(heads, tmp_path):
    root = heads["root"]
    out = tmp_path / "anon"
    anonymize_into(heads["src"], root / "ingest", out, KEY, {})  # defacing off
    assert audit_of(out, root / "ingest", KEY)["passed"]
    result = audit_of(out, root / "ingest", KEY, deface={"enabled": True, "modalities": ["CT", "MR"]})
    assert not result["passed"]
    kinds = {f["kind"] for f in result["findings"]}
    assert kinds == {"head volume not defaced"}
    # the volume's slices, the unstackable series' slices and the enhanced file; not the two-slice series
    assert len(result["findings"]) == len(heads["volume"]) + 21 + 1


def test_a_series_is_never_split_between_shards(heads, tmp_path):
    root = heads["root"]
    rows = _rows(root / "ingest" / "manifest.csv")
    total = 0
    for i in range(4):
        out = tmp_path / f"s{i}"
        summary = anonymize_into(heads["src"], root / "ingest", out, KEY,
                                 {"deface": {"enabled": True, "modalities": ["CT"]}}, shard=(i, 4))
        total += summary["inputs"]
        series = {m["series"] for m in _rows(out / "manifest.csv")}
        for s in series:
            assert len([m for m in _rows(out / "manifest.csv") if m["series"] == s]) in (1, 2, len(heads["volume"]))
    assert total == len(rows)
    by_series = {}
    for r in rows:
        by_series.setdefault(r["series_uid"], set()).add(shard_of("series:" + r["series_uid"], 4))
    assert all(len(v) == 1 for v in by_series.values())


@pytest.mark.integration
def test_snakemake_defaces_and_audits_a_head_project(root, tmp_path):
    """The config schema, the rules and the audit gate: a project of head volumes through
    Snakemake's anonymize shards and audit."""
    import subprocess
    import sys

    import yaml

    work = tmp_path / "work"
    src = work / "heads"
    for n, modality in enumerate(["CT", "MR", "CT"]):
        datasets, _ = headphantom.series(modality, seed=10 + n, size=96, pixel_mm=2.5, slice_mm=4.0)
        for ds in datasets:
            ds.PatientID = f"HEAD-{n:04d}"
        headphantom.write(datasets, src / f"s{n}")
    conf = yaml.safe_load((root / "config.yaml").read_text())
    conf["projects"] = {"heads": {"source": str(src), "shards": 2,
                                  "anonymize": {"deface": {"enabled": True, "modalities": ["CT", "MR"]}}}}
    (work / "config.yaml").write_text(yaml.safe_dump(conf))
    cmd = [sys.executable, "-m", "snakemake", "results/heads/anonymize/audit.json", "-s", str(root / "Snakefile"),
           "--directory", str(work), "--configfile", str(work / "config.yaml"), "--cores", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    anon = work / "results" / "heads" / "anonymize"
    import json

    assert json.loads((anon / "audit.json").read_text())["passed"]
    manifest = _rows(anon / "manifest.csv")
    assert len(manifest) == sum(1 for _ in src.rglob("*.dcm")) and not _rows(anon / "quarantine.csv")
    for m in manifest:
        ds = pydicom.dcmread(anon / "data" / m["file"], stop_before_pixels=True)
        assert ds.RecognizableVisualFeatures == "NO"
        assert "113102" in {str(i.CodeValue) for i in ds.DeidentificationMethodCodeSequence}
