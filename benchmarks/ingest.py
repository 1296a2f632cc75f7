"""Ingest and anonymize at scale: files/s against a bare pydicom loop, scaling with 2 workers,
and peak memory (RSS) of one shard job as the cohort grows.

* throughput (on the 10k cohort): ``haven ingest`` of the whole cohort as one job, next to a bare
  ``pydicom.dcmread(stop_before_pixels=True)`` loop over the same files (the floor of reading
  every header once) and ``dcmread`` + decoding the pixels (what ingest checks by default);
  then the same cohort as 2 shards run side by side (2 workers); the same for ``haven anonymize``
  next to a bare ``dcmread`` + ``save_as`` loop.
* memory: the peak RSS of one ingest and one anonymize shard job (``files_per_shard`` files) at
  10k and at 100k files: a shard job's memory depends on its shard, not on the cohort.

* real compressed CT (``--real N``, default 2000): deid-data's two Siemens head CTs (JPEG
  Baseline, YBR_FULL_422), copied to N files with their own patients, UIDs and planted PHI as
  benchmarks/anonymize.py builds them; in this process, one core: ``haven.ingest.ingest`` next to
  the bare header loop, and ingest + anonymize + audit (``haven deid`` end to end) next to
  dicognito's anonymize (read, anonymize, save) alone, each pair run interleaved, best of
  ``--repeat`` rounds, as files/s and their ratio.

Measured (2000 real CT, 2-core shared machine, one core used, adjacent runs): before the byte-level
parse (haven.deid.rawread) ingest 52 % of the header loop and ingest+anonymize+audit 139 files/s
= 1.15x dicognito's 121; after it 146 % and 409 files/s = 3.41x dicognito's 120.

    python benchmarks/ingest.py                   # 10k and 100k files, then 2000 real CT
    python benchmarks/ingest.py --sizes 2000 20000 --files-per-shard 1000
    python benchmarks/ingest.py --real-only --real 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cohort import make_cohort  # noqa: E402

KEY = "benchmark-key-" + "x" * 32


def haven(*args: str) -> tuple[float, int]:
    """Run ``haven ARGS`` as its own process: (seconds, peak RSS in MiB)."""
    env = dict(os.environ, HAVEN_KEY=KEY, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "haven.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"haven {' '.join(args)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss // 1024


def haven_parallel(runs: list[list[str]]) -> float:
    env = dict(os.environ, HAVEN_KEY=KEY, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "haven.cli", *a], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for a in runs]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(p.stderr.read().decode()[-3000:])
    return time.perf_counter() - t0


def bare(files: list[Path], what: str, out: Path | None = None) -> float:
    import pydicom

    t0 = time.perf_counter()
    for i, f in enumerate(files):
        if what == "header":
            pydicom.dcmread(f, stop_before_pixels=True)
        elif what == "pixels":
            pydicom.dcmread(f).pixel_array  # noqa: B018
        else:
            ds = pydicom.dcmread(f)
            ds.save_as(out / f"{i}.dcm")
    return time.perf_counter() - t0


PARAMS = json.dumps({"key_env": "HAVEN_KEY", "anonymize": {}, "labels": None, "label_column": "label"})


def tables(folder: Path) -> list[str]:
    """`haven ingest` arguments writing its three tables into ``folder``."""
    return ["--manifest", str(folder / "manifest.csv"), "--identifiers", str(folder / "identifiers.csv"),
            "--quarantine", str(folder / "quarantine.csv")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--files-per-shard", type=int, default=5000)
    ap.add_argument("--work", default="/tmp/haven-ingest-bench")
    ap.add_argument("--throughput-only", action="store_true", help="skip the peak-RSS runs (100k files)")
    ap.add_argument("--real", type=int, default=2000, help="real JPEG CT files (0: skip)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the real-CT pairs (best kept)")
    ap.add_argument("--real-only", action="store_true", help="only the real compressed CT runs")
    args = ap.parse_args()
    if args.real:
        real_ct(Path(args.work) / "real", args.real, args.repeat)
    if args.real_only:
        return 0
    work = Path(args.work)
    small, sizes = args.sizes[0], args.sizes
    src = make_cohort(work / f"cohort-{small}", small, per_patient=10)
    # a class-folder layout gives every file a label without a label table
    files = sorted(src.rglob("*.dcm"))
    n = len(files)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    (out / "bare").mkdir(parents=True)

    t_header, t_pixels = bare(files, "header"), bare(files, "pixels")
    t_save = bare(files, "save", out / "bare")
    from haven.ingest import ingest  # in this process, like the bare loops (no interpreter start-up)

    t0 = time.perf_counter()
    ingest(src, out / "ingest-inproc")
    t_inproc = time.perf_counter() - t0
    t_ingest, _ = haven("ingest", str(src), *tables(out / "ingest"), "--params", PARAMS)
    t_ingest2 = haven_parallel([["ingest", str(src), *tables(out / f"ingest2-{i}"), "--shard", f"{i}/2",
                                 "--params", PARAMS] for i in range(2)])
    t_anon, _ = haven("anonymize", str(src), str(out / "ingest"), str(out / "anon"), "--params", PARAMS)
    t_anon2 = haven_parallel([["anonymize", str(src), str(out / "ingest"), str(out / f"anon2-{i}"), "--shard",
                               f"{i}/2", "--params", PARAMS] for i in range(2)])
    rate = lambda t: n / t  # noqa: E731
    print(f"{n} files, one process each unless said")
    print(f"  bare dcmread(stop_before_pixels)  {rate(t_header):8.0f} files/s")
    print(f"  bare dcmread + pixel_array        {rate(t_pixels):8.0f} files/s")
    print(f"  haven ingest, 1 worker            {rate(t_ingest):8.0f} files/s  = {t_header / t_ingest:.0%} of the "
          f"header loop, {t_pixels / t_ingest:.0%} of header+pixels (process start-up included)")
    print(f"  haven ingest, in this process     {rate(t_inproc):8.0f} files/s  = {t_header / t_inproc:.0%} of the "
          f"header loop (same conditions as the bare loops)")
    print(f"  haven ingest, 2 workers (shards)  {rate(t_ingest2):8.0f} files/s  scaling efficiency "
          f"{t_ingest / t_ingest2 / 2:.0%}")
    print(f"  bare dcmread + save_as            {rate(t_save):8.0f} files/s")
    print(f"  haven anonymize, 1 worker         {rate(t_anon):8.0f} files/s  = {t_save / t_anon:.0%} of read+save")
    print(f"  haven anonymize, 2 workers        {rate(t_anon2):8.0f} files/s  scaling efficiency "
          f"{t_anon / t_anon2 / 2:.0%}", flush=True)
    if args.throughput_only:
        return 0

    print(f"peak RSS of one shard job ({args.files_per_shard} files per shard):")
    for size in sizes:
        src = make_cohort(work / f"cohort-{size}", size, per_patient=10)
        shards = max(1, math.ceil(size / args.files_per_shard))
        o = work / f"rss-{size}"
        shutil.rmtree(o, ignore_errors=True)
        _, rss_i = haven("ingest", str(src), *tables(o / "ingest" / "0"), "--shard", f"0/{shards}", "--params", PARAMS)
        for first in range(1, shards, 2):  # the other shards, two at a time, for the whole manifest
            haven_parallel([["ingest", str(src), *tables(o / "ingest" / str(i)), "--shard", f"{i}/{shards}",
                             "--params", PARAMS] for i in range(first, min(first + 2, shards))])
        from haven.ingest import merge_ingest

        merge_ingest([o / "ingest" / str(i) for i in range(shards)], o / "ingest")
        t, rss_a = haven("anonymize", str(src), str(o / "ingest"), str(o / "anon"), "--shard", f"0/{shards}",
                         "--params", PARAMS)
        print(f"  {size:>7} files, {shards:>3} shards: ingest {rss_i:5d} MiB, anonymize {rss_a:5d} MiB", flush=True)
    return 0


def real_corpus(root: Path, n: int) -> list[Path]:
    """``n`` copies of deid-data's two JPEG-compressed YBR head CTs, built as benchmarks/anonymize.py
    builds its corpus (its third base, pydicom's uncompressed CT_small, replaced by the first)."""
    import deid_data
    import pydicom.data

    from anonymize import make_corpus

    first = str(Path(deid_data.__file__).parent / "data" / "humans" / "ctbrain1.dcm")
    real = pydicom.data.get_testdata_file
    pydicom.data.get_testdata_file = lambda name, *a, **k: first  # noqa: ARG005 - only CT_small is asked
    try:
        return make_corpus(root, n, per_patient=20)
    finally:
        pydicom.data.get_testdata_file = real


def real_ct(work: Path, n: int, repeat: int) -> None:
    """haven on real compressed CT, in this process: ingest vs the bare header loop, and ingest +
    anonymize + audit vs dicognito's anonymize, interleaved (the machine is shared: ratios, not
    absolute figures, are what compares)."""
    import logging
    import warnings

    import pydicom

    from anonymize import KEY as ANON_KEY
    from anonymize import run_dicognito
    from haven.deid.oneshot import deidentify
    from haven.ingest import ingest

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    files = real_corpus(work / "corpus", n)
    src = work / "corpus"

    def fresh(name: str) -> Path:
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)
        return work / name

    def header_loop() -> None:
        for f in files:
            pydicom.dcmread(f, stop_before_pixels=True)

    def haven_ingest() -> None:
        ingest(src, fresh("ingest"))

    def haven_deid() -> None:  # `haven deid SRC DST` without the command line: ingest, anonymize, audit
        shutil.rmtree(work / "deid", ignore_errors=True)
        summary = deidentify(src, work / "deid", ANON_KEY, work=fresh("deid-phi"))
        audits.append(summary["findings"])

    def dicognito() -> None:
        run_dicognito(files, fresh("dicognito"))

    best: dict[str, float] = {}
    audits: list[int] = []
    for _ in range(repeat):  # interleaved pairs, the best of each kept
        for name, fn in (("header", header_loop), ("ingest", haven_ingest), ("dicognito", dicognito),
                         ("deid", haven_deid)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best.get(name, math.inf), time.perf_counter() - t0)
    rate = {k: n / t for k, t in best.items()}
    print(f"{n} real CT slices (deid-data's 2 Siemens head CTs, JPEG Baseline, YBR_FULL_422, 456x510), "
          f"{n // 20} patients; in this process, best of {repeat} interleaved rounds")
    print(f"  bare dcmread(stop_before_pixels)  {rate['header']:8.0f} files/s")
    print(f"  haven ingest                      {rate['ingest']:8.0f} files/s  = {rate['ingest'] / rate['header']:.0%} "
          f"of the header loop (target 90%)")
    print(f"  dicognito anonymize (read+save)   {rate['dicognito']:8.0f} files/s")
    print(f"  haven ingest+anonymize+audit      {rate['deid']:8.0f} files/s  = "
          f"{rate['deid'] / rate['dicognito']:.2f}x dicognito (target 3x); audit findings {audits[-1]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
