"""Defacing speed and accuracy on head volumes of clinical size (the synthetic head of
tests/headphantom.py: brain in a closed skull, scalp, face, nose, eyes, neck, voxel by voxel known).

For each volume: seconds per volume (the brain mask, the Quickshear plane and the pixel rewrite,
files already read), slices per second, and what was cut: the share of the nose, eyes and face
removed (should be ~1) and of the brain removed (should be 0).

    python benchmarks/deface.py                 # CT 512x512x48 (0.45 mm, 4.5 mm slices), MR 256x256x176 (1 mm)
    python benchmarks/deface.py --quick         # smaller volumes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import headphantom  # noqa: E402

from haven.deid import deface  # noqa: E402


def run(modality: str, pixel_mm: float, slice_mm: float, size: int, z: tuple[float, float]) -> dict:
    datasets, parts = headphantom.series(modality, pixel_mm=pixel_mm, slice_mm=slice_mm, size=size, z=z)
    before = headphantom.stack(datasets)
    opts = deface.options({"enabled": True, "modalities": [modality]})
    t = time.perf_counter()
    deface.deface(datasets, opts)
    seconds = time.perf_counter() - t
    after = headphantom.stack(datasets)
    bg = before.min()
    cut = (after == bg) & (before != bg)
    return {"modality": modality, "shape": "x".join(map(str, before.shape)), "seconds": seconds,
            "slices_per_s": len(datasets) / seconds,
            **{f"{p}_removed": float(cut[parts[p]].mean()) for p in ("nose", "eyes", "face", "brain", "skull")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        cases = [("CT", 2.0, 3.0, 128, (-110.0, 100.0)), ("MR", 2.0, 2.0, 128, (-110.0, 100.0))]
    else:
        cases = [("CT", 0.45, 4.5, 512, (-110.0, 100.0)), ("MR", 1.0, 1.2, 256, (-110.0, 100.0))]
    warm, _ = headphantom.series("MR", pixel_mm=2.0, slice_mm=4.0, size=128)
    deface.deface(warm, deface.options({"enabled": True}))  # warm-up: BET's numba functions compile once
    for case in cases:
        r = run(*case)
        print(f"{r['modality']} {r['shape']}: {r['seconds']:.1f} s per volume, {r['slices_per_s']:.1f} slices/s; "
              f"removed: nose {r['nose_removed']:.3f}, eyes {r['eyes_removed']:.3f}, face {r['face_removed']:.3f}, "
              f"brain {r['brain_removed']:.4f}, skull {r['skull_removed']:.3f}")


if __name__ == "__main__":
    main()
