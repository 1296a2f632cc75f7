"""De-identification speed and leaks: haven next to pydicom/deid, dicognito and dicom-anonymizer.

The corpus: ``--files`` copies of real CT slices (deid-data's two Siemens head CTs, JPEG
compressed, and pydicom's CT_small), each with its own patient (``--per-patient`` slices per
patient), UIDs, dates and PHI planted where real files carry it: the patient's name in a free-text
comment, a referring physician, a name inside a sequence, the patient id in a private tag, and a
reference from each slice to the previous slice of its series.

Every tool runs with its defaults, in one process, through its Python API, over the same files;
the floor is a bare ``pydicom.dcmread`` + ``save_as`` loop.  Each output is then checked with
haven's audit (any original identifier anywhere: file names, headers, sequences, private tags) and
for broken references (a ReferencedSOPInstanceUID that matches no output SOPInstanceUID).

    pip install -e .[bench]       # deid, dicognito, dicom-anonymizer (benchmark-only)
    python benchmarks/anonymize.py                      # 2000 files
    python benchmarks/anonymize.py --files 500 --workers 2
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

KEY = b"benchmark-key-" + b"x" * 32


def make_corpus(root: Path, n: int, per_patient: int) -> list[Path]:
    import deid_data
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    done = root / ".complete"
    files = [root / "ct" / f"img{i:05d}.dcm" for i in range(n)]
    if done.is_file() and done.read_text() == f"{n}/{per_patient}":
        return files
    shutil.rmtree(root, ignore_errors=True)
    (root / "ct").mkdir(parents=True)
    humans = Path(deid_data.__file__).parent / "data" / "humans"
    bases = [pydicom.dcmread(humans / "ctbrain1.dcm"), pydicom.dcmread(humans / "ctbrain2.dcm"),
             pydicom.dcmread(get_testdata_file("CT_small.dcm"))]
    root_uid = "1.2.826.0.1.3680043.10.2024."
    prev_sop: dict[int, str] = {}
    for i, path in enumerate(files):
        p = i // per_patient
        ds = bases[i % len(bases)].copy()
        first, last = f"NAME{p:05d}", f"SURNAME{p:05d}"
        ds.PatientName = f"{last}^{first}"
        ds.PatientID = f"MRN{700000 + p}"
        ds.PatientBirthDate = f"19{40 + p % 50:02d}{1 + p % 12:02d}{1 + p % 28:02d}"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"2019{1 + p % 12:02d}{1 + i % 28:02d}"
        ds.AccessionNumber = f"ACC{900000 + p}"
        ds.InstitutionName = f"Saint Example Hospital {p % 7}"
        ds.ReferringPhysicianName = f"REFERRER{p % 13:02d}^ALICE"
        ds.StudyInstanceUID = f"{root_uid}1.{p}"
        ds.SeriesInstanceUID = f"{root_uid}2.{p}"
        ds.SOPInstanceUID = f"{root_uid}3.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.FrameOfReferenceUID = f"{root_uid}4.{p}"
        ds.ImageComments = f"seen with {first} {last}, MRN{700000 + p}"
        req = Dataset()
        req.ScheduledPerformingPhysicianName = f"SCHEDULER{p % 11:02d}^BOB"
        req.RequestedProcedureID = f"RP{p:06d}"
        ds.RequestAttributesSequence = Sequence([req])
        block = ds.private_block(0x0019, "HAVEN BENCH", create=True)
        block.add_new(0x10, "LO", f"MRN{700000 + p}")
        if "ReferencedImageSequence" in ds:
            del ds.ReferencedImageSequence  # the base files' own references point outside the corpus
        if p in prev_sop:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = prev_sop[p]
            ds.ReferencedImageSequence = Sequence([ref])
        prev_sop[p] = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
    done.write_text(f"{n}/{per_patient}")
    return files


# ---------------------------------------------------------------------------------------------
# the tools, each over a list of files into an output folder


def run_bare(files, out: Path) -> None:
    import pydicom

    for i, f in enumerate(files):
        pydicom.dcmread(f).save_as(out / f"{i}.dcm")


def run_haven(files, out: Path, src: Path, ingest: Path) -> None:
    from haven.deid.anonymize import anonymize

    anonymize(src, ingest / "manifest.csv", KEY, data=out / "data", manifest=out / "manifest.csv",
              log_csv=out / "anonymization.log.csv", quarantine=out / "quarantine.csv")


def run_dicognito(files, out: Path) -> None:
    import pydicom
    from dicognito.anonymizer import Anonymizer

    a = Anonymizer()
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        a.anonymize(ds)
        ds.save_as(out / f"{i}.dcm")


def run_dicom_anonymizer(files, out: Path) -> None:
    from dicomanonymizer import anonymize_dicom_file

    for i, f in enumerate(files):
        anonymize_dicom_file(str(f), str(out / f"{i}.dcm"))


def run_deid(files, out: Path) -> None:
    from deid.dicom import replace_identifiers

    replace_identifiers([str(f) for f in files], save=True, output_folder=str(out), overwrite=True)


TOOLS = {"dicognito": run_dicognito, "dicom-anonymizer": run_dicom_anonymizer, "deid": run_deid}


def broken_references(out: Path) -> tuple[int, int]:
    """(references, references to no output SOPInstanceUID)."""
    import pydicom

    sops, refs = set(), []
    for f in out.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sops.add(str(ds.get("SOPInstanceUID", "")))
        for item in ds.get("ReferencedImageSequence", []) or []:
            refs.append(str(item.get("ReferencedSOPInstanceUID", "")))
    return len(refs), sum(r not in sops for r in refs)


def leaks(out: Path, ingest: Path, files: list[Path], name: str) -> tuple[int, int, list[str]]:
    """(findings, files with a finding, the most common places) under haven's audit, per patient:
    a date counts when it is one of the same patient's original dates (another patient's dates are
    chance).  haven's output gets haven's own gate (which also knows its keyed date shifts)."""
    from collections import Counter

    from haven.deid.audit import audit
    from haven.deid.identifiers import Identifiers, load_identifiers, read_csv
    from haven.deid.scan import scan_tree

    if name == "haven":
        result = audit([out / "data"], out / "manifest.csv", out / "anonymization.log.csv",
                       ingest / "identifiers.csv", ingest / "manifest.csv", key=KEY)
        findings = result["findings"]
    else:
        rows = read_csv(ingest / "manifest.csv")
        patient = {r["path"].rsplit("/", 1)[-1]: r["patient_id"] for r in rows}
        patient_of = {}
        for f in out.rglob("*.dcm"):
            rel = f.relative_to(out).as_posix()
            stem = f.name
            if stem.split(".")[0].isdigit():  # tools writing <index>.dcm
                stem = files[int(stem.split(".")[0])].name
            patient_of[rel] = patient.get(stem, "")
        _, findings = scan_tree(out, Identifiers(load_identifiers(ingest / "identifiers.csv", ingest / "manifest.csv")),
                                patient_of)
    nfiles = {f["file"] for f in findings}
    where = Counter(f["where"].split("[")[0] for f in findings)
    return len(findings), len(nfiles), [w for w, _ in where.most_common(4)]


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--per-patient", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="haven shards run side by side (scaling)")
    ap.add_argument("--work", default="/tmp/haven-anonymize-bench")
    ap.add_argument("--leaks-only", action="store_true", help="only re-audit the outputs of an earlier run")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    work = Path(args.work)
    src = work / "corpus"
    t0 = time.perf_counter()
    files = make_corpus(src, args.files, args.per_patient)
    print(f"corpus: {len(files)} real CT slices (3 bases), {args.files // args.per_patient} patients, "
          f"made in {time.perf_counter() - t0:.0f}s; one process each unless said")

    from haven.ingest import ingest

    ingest_dir = work / "ingest"
    shutil.rmtree(ingest_dir, ignore_errors=True)
    t_ingest = timed(ingest, src, ingest_dir)

    def fresh(name: str) -> Path:
        out = work / "out" / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out

    rows = []
    if args.leaks_only:
        rows = [(n, 0.0, work / "out" / n) for n in ("haven", *TOOLS) if (work / "out" / n).is_dir()]
        report_leaks(rows, ingest_dir, files)
        return
    t = timed(run_bare, files, fresh("bare"))
    floor = len(files) / t
    print(f"  bare dcmread + save_as          {floor:7.1f} files/s  (the floor)")
    t = timed(run_haven, files, fresh("haven"), src, ingest_dir)
    haven_rate = len(files) / t
    rows.append(("haven", haven_rate, work / "out" / "haven"))
    print(f"  haven anonymize                 {haven_rate:7.1f} files/s  = {haven_rate / floor:.0%} of the floor "
          f"(ingest before it: {len(files) / t_ingest:.0f} files/s)")
    for name, fn in TOOLS.items():
        try:
            t = timed(fn, files, fresh(name))
        except ImportError:
            print(f"  {name:<30}   not installed (pip install -e .[bench])")
            continue
        except Exception as e:  # a tool that fails on real files is a finding, not a crash
            print(f"  {name:<30}   failed: {type(e).__name__}")
            continue
        rows.append((name, len(files) / t, work / "out" / name))
        print(f"  {name:<30}  {len(files) / t:7.1f} files/s")

    if args.workers > 1:
        env = dict(os.environ, HAVEN_KEY=KEY.decode(), OMP_NUM_THREADS="1")
        outs = [fresh(f"haven-{k}") for k in range(args.workers)]
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "haven.cli", "anonymize", str(src),
                                   "--ingest-manifest", str(ingest_dir / "manifest.csv"), "--data", str(o / "data"),
                                   "--manifest", str(o / "manifest.csv"), "--log", str(o / "anonymization.log.csv"),
                                   "--quarantine", str(o / "quarantine.csv"), "--shard", f"{k}/{args.workers}",
                                   "--params", '{"anonymize": {}, "key_env": "HAVEN_KEY"}'],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for k, o in enumerate(outs)]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(p.stderr.read().decode()[-2000:])
        rate = len(files) / (time.perf_counter() - t0)
        print(f"  haven anonymize, {args.workers} workers      {rate:7.1f} files/s  scaling efficiency "
              f"{rate / (args.workers * haven_rate):.0%} (process start-up included)")

    others = [r for r in rows if r[0] != "haven"]
    if others:
        best = max(others, key=lambda r: r[1])
        print(f"  haven / fastest other tool ({best[0]}): {haven_rate / best[1]:.2f}x  (target 3x)")
    report_leaks(rows, ingest_dir, files)


def report_leaks(rows, ingest_dir: Path, files: list[Path]) -> None:
    print("leaks under haven's audit, and references between files:")
    for name, _, out in rows:
        n, nfiles, where = leaks(out, ingest_dir, files, name)
        refs, broken = broken_references(out)
        print(f"  {name:<18} {n:6d} findings in {nfiles:5d} files  {broken:5d}/{refs} references broken"
              + (f"   e.g. {', '.join(where)}" if where else ""))


if __name__ == "__main__":
    main()
