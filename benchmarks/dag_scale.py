"""DAG scale: time `snakemake -n` on a project of 10,000 and 100,000 DICOM files.

Ingest and anonymize run in shards of ``files_per_shard`` files, so the DAG grows with the
number of shards, not of files; building it costs one walk of the source to count the files.
Prints both times and their ratio (10x the files; target: under 15 s at 100k, growth close to
linear or better).

    python benchmarks/dag_scale.py                       # 10k and 100k files, 5000 per shard
    python benchmarks/dag_scale.py --sizes 1000 10000 --work /tmp/haven-scale
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cohort import make_cohort  # noqa: E402


def dry_run(work: Path, source: Path, files_per_shard: int) -> tuple[float, int, int]:
    conf = yaml.safe_load((ROOT / "config.yaml").read_text())
    ct = conf["projects"]["brain-ct"]
    conf["projects"] = {"cohort": {**{k: v for k, v in ct.items() if k not in ("demo", "labels", "label_key")},
                                   "source": str(source), "files_per_shard": files_per_shard}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(conf))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--configfile",
           str(work / "config.yaml"), "-n", "--cores", "2"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(run.stdout[-3000:] + run.stderr[-3000:])
    total = int(re.search(r"^total\s+(\d+)", run.stdout, re.M).group(1))
    shards = int(re.search(r"^ingest_shard\s+(\d+)", run.stdout, re.M).group(1))
    return seconds, total, shards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--files-per-shard", type=int, default=5000)
    ap.add_argument("--work", default="/tmp/haven-dag-scale")
    ap.add_argument("--repeat", type=int, default=3, help="dry runs per size (the best is reported)")
    args = ap.parse_args()
    work = Path(args.work)
    times = {}
    for n in args.sizes:
        t0 = time.perf_counter()
        src = make_cohort(work / f"cohort-{n}", n)
        made = time.perf_counter() - t0
        best, total, shards = min(dry_run(work / f"run-{n}", src, args.files_per_shard) for _ in range(args.repeat))
        times[n] = best
        print(f"{n:>7} files: snakemake -n {best:6.2f} s  ({shards} shards, {total} jobs; cohort ready in "
              f"{made:.0f} s)", flush=True)
    if len(times) >= 2:
        (a, ta), (b, tb) = sorted(times.items())[0], sorted(times.items())[-1]
        print(f"ratio {tb / ta:.2f} for {b / a:.0f}x the files (linear would be {b / a:.0f}); "
              f"target under 15 s at {b}: {'met' if tb < 15 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
