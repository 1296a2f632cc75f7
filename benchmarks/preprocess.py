"""Preprocess throughput: samples/s with 1 and 2 Dask workers (scaling efficiency) and the
bytes/s of the decode pipeline against a bare read of the same files.

    python benchmarks/preprocess.py                  # the demo brain-ct DICOM set, replicated
    python benchmarks/preprocess.py --copies 4 --size 128
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd


def build_input(tmp: Path, copies: int) -> tuple[Path, int]:
    """An audited anonymize folder: the demo brain-ct slices, `copies` times over."""
    from haven import demo

    src = tmp / "demo"
    demo.make_brain_ct(src, n_patients=20, slices=4, seed=0)
    anon = tmp / "anon"
    (anon / "data").mkdir(parents=True)
    files = sorted((src / "dicom").rglob("*.dcm"))
    rows = []
    for c in range(copies):
        for i, f in enumerate(files):
            if f.stat().st_size < 10_000:  # the planted truncated/text files
                continue
            name = f"c{c}_{i}.dcm"
            shutil.copyfile(f, anon / "data" / name)
            rows.append({"file": name, "kind": "dicom", "patient": f"P{c}_{f.parent.parent.name[-4:]}",
                         "study": "", "series": "", "label": "a" if i % 2 else "b", "sex": "", "age_band": "",
                         "site": "", "modality": "CT"})
    pd.DataFrame(rows).to_csv(anon / "manifest.csv", index=False)
    (anon / "audit.json").write_text(json.dumps({"passed": True}))
    return anon, sum((anon / "data" / r["file"]).stat().st_size for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    from haven.learn.preprocess import preprocess

    params = {"size": args.size, "mode": "ct", "windows": [{"center": 40, "width": 80}, {"center": 80, "width": 200},
              {"center": 600, "width": 2800}], "split": {"val": 0.15, "test": 0.2}, "chunk": 64}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        anon, nbytes = build_input(tmp, args.copies)
        n = len(pd.read_csv(anon / "manifest.csv"))
        t = time.perf_counter()
        for f in (anon / "data").iterdir():
            f.read_bytes()
        bare = time.perf_counter() - t
        from haven.learn.preprocess import load_batch

        rows = pd.read_csv(anon / "manifest.csv")
        sample = [str(anon / "data" / f) for f in rows["file"][:128]]
        load_batch(sample[:2], ["dicom"] * 2, params)  # imports
        t = time.perf_counter()
        load_batch(sample, ["dicom"] * len(sample), params)
        decode = len(sample) / (time.perf_counter() - t)
        rates = {}
        for workers in (1, 2):
            t = time.perf_counter()
            preprocess(anon, tmp / f"out{workers}", dict(params, workers=workers), seed=42)
            rates[workers] = n / (time.perf_counter() - t)
    print(f"{n} CT slices ({nbytes / 1e6:.1f} MB), output {args.size}x{args.size}x3 windows")
    print(f"decode+window+resize in one process (no Dask): {decode:8.1f} samples/s  "
          f"{decode * nbytes / n / 1e6:8.1f} MB/s")
    print(f"1 worker : {rates[1]:8.1f} samples/s  {rates[1] * nbytes / n / 1e6:8.1f} MB/s")
    print(f"2 workers: {rates[2]:8.1f} samples/s  {rates[2] * nbytes / n / 1e6:8.1f} MB/s")
    print(f"scaling efficiency (2 workers): {rates[2] / (2 * rates[1]):.2f}")
    print(f"bare read: {nbytes / bare / 1e6:8.1f} MB/s; preprocess(2) / bare read = {rates[2] * nbytes / n / (nbytes / bare):.4f}")
    print("(whole-stage figures: they include the Dask cluster start-up, splitting and the Zarr writes)")


if __name__ == "__main__":
    main()
