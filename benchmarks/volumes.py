"""Volumes: the gate and preprocessing of NIfTI/BIDS volumes against a bare nibabel read of the same files.

On the brain-mri demo (BIDS, 3 mm 66x78x63 T1w volumes from the MNI152 template, gzip; generated
into a temporary folder), each figure beside its baseline in the same run:

* ingest (headers, sidecars by inheritance, identifiers, every voxel decoded once) in volumes/s,
  against ``nibabel.load`` + reading the voxels;
* ``haven deid`` without defacing (ingest, anonymize: fresh header, clean sidecar, keyed BIDS
  names; the audit re-reading every output) against reading and re-writing each file with
  nibabel (what any converter does at least);
* defacing (BET's surface + Quickshear), seconds per volume, warm;
* preprocessing one volume (``haven.learn.volumes.load_volume``: RAS, spacing, intensity, crop,
  size) at 3 mm / 48^3 and at 2 mm / 96^3 (the 1 mm template), with the peak memory one volume
  takes (tracemalloc: NumPy's allocations), against ``get_fdata``.

    python benchmarks/volumes.py                # 24 subjects
    python benchmarks/volumes.py --subjects 80  # the demo's size
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np


def _volumes(root: Path) -> list[Path]:
    return sorted(p for p in (root / "bids").rglob("sub-*_T1w.nii.gz") if "derivatives" not in p.parts)


def _bare_read(files: list[Path]) -> float:
    t = time.perf_counter()
    for f in files:
        try:
            np.asanyarray(nib.load(f).dataobj)
        except Exception:
            pass
    return time.perf_counter() - t


def _bare_rewrite(files: list[Path], out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for i, f in enumerate(files):
        try:
            img = nib.load(f)
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), out / f"{i}.nii.gz")
        except Exception:
            pass
    return time.perf_counter() - t


def gate(root: Path, tmp: Path) -> None:
    from haven.deid.oneshot import deidentify
    from haven.ingest import ingest

    files = _volumes(root)
    ingest(root / "bids", tmp / "warm", check_pixels=True, labels_required=False)  # imports, schema load
    t = time.perf_counter()
    ingest(root / "bids", tmp / "ingest", check_pixels=True, labels_required=False)
    mine, bare = time.perf_counter() - t, _bare_read(files)
    print(f"ingest: {len(files) / mine:.1f} volumes/s; bare nibabel read {len(files) / bare:.1f}/s "
          f"(haven takes {mine / bare:.1f}x the bare read)")
    key = os.urandom(32)
    t = time.perf_counter()
    summary = deidentify(root / "bids", tmp / "deid", key, options={"deface": {"volumes": False}},
                         work=tmp / "phi", label_folders=False)
    mine, bare = time.perf_counter() - t, _bare_rewrite(files, tmp / "rewrite")
    assert summary["audit_passed"], summary
    print(f"haven deid (no defacing, audit included): {len(files) / mine:.1f} volumes/s; bare nibabel read + "
          f"write {len(files) / bare:.1f}/s ({mine / bare:.1f}x)")


def defacing(root: Path, n: int = 3) -> None:
    from haven.deid import deface

    opts = deface.options({"enabled": True})
    files = _volumes(root)[: n + 1]
    img = nib.load(files[0])
    deface.deface_array(np.asanyarray(img.dataobj, dtype=np.float32), img.affine, "MR", opts)  # warm-up
    t = time.perf_counter()
    for f in files[1:]:
        img = nib.load(f)
        deface.deface_array(np.asanyarray(img.dataobj, dtype=np.float32), img.affine, "MR", opts)
    print(f"defacing (BET + Quickshear, {img.shape}): {(time.perf_counter() - t) / n:.1f} s per volume")


def preprocessing(root: Path) -> None:
    import nilearn

    from haven.learn.volumes import load_volume

    template = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    cases = [("demo 3 mm -> 3 mm / 48^3", _volumes(root)[:10], 3.0, 48),
             ("MNI 1 mm -> 2 mm / 96^3", [template] * 3, 2.0, 96),
             ("MNI 1 mm -> 4 mm / 48^3", [template] * 3, 4.0, 48)]
    load_volume(cases[0][1][0], spacing_mm=3.0, size=48, mode="mr", windows=[])  # warm-up
    for name, files, spacing, size in cases:
        tracemalloc.start()
        t = time.perf_counter()
        for f in files:
            load_volume(f, spacing_mm=spacing, size=size, mode="mr", windows=[])
        mine = (time.perf_counter() - t) / len(files)
        peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
        t = time.perf_counter()
        for f in files:
            nib.load(f).get_fdata()
        bare = (time.perf_counter() - t) / len(files)
        print(f"preprocess {name}: {mine:.3f} s per volume ({1 / mine:.1f}/s), peak {peak:.0f} MiB per volume; "
              f"bare get_fdata {bare:.3f} s ({mine / bare:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=24)
    ap.add_argument("--no-deface", action="store_true", help="skip the defacing figure (about 10 s a volume)")
    args = ap.parse_args()
    from haven.demomri import make_brain_mri

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        summary = make_brain_mri(tmp / "demo", subjects=args.subjects)
        print(f"brain-mri demo: {summary['volumes']} volumes in {time.perf_counter() - t:.1f} s")
        gate(tmp / "demo", tmp)
        preprocessing(tmp / "demo")
        if not args.no_deface:
            defacing(tmp / "demo")
    print("3D training volumes/s and sliding-window inference: not yet (the 3D task is the next step of issue 20)")


if __name__ == "__main__":
    main()
