"""The audit's precision and recall on real files: pydicom's test files and deid-data together.

Every file of both corpora is copied into one source folder and run through the stages as the
rules run them (ingest -> anonymize -> audit), with a fixed benchmark key.  The anonymized output
should pass: every finding there is a false positive (both corpora are test data whose values
were made up or already scrubbed; haven removes or replaces every identifying element), so the
count printed is the audit's false findings.  Recall: the audit of the *originals* (audit_tree
over the source with ingest's identifiers) is compared finding by finding with a saved baseline
(``--baseline``): a change to the matching must not lose one.

Findings are printed as file / place / kind, never the value (this output may be shared).
Measured (191 files, 77 anonymized outputs): 1 false finding before the coded-term rule of
haven.deid.identifiers (BodyPartExamined matched another patient's BranchOfService), 0 after; the
originals' 4762 findings all still found.

    python benchmarks/audit_precision.py                 # work folder: a temporary one
    python benchmarks/audit_precision.py --work /tmp/ap  # kept: a second run reuses the anonymized output
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

KEY = b"audit-precision-key-" + b"x" * 32


def make_source(root: Path) -> Path:
    """pydicom's test files under ``pydicom/``, deid-data's data under ``deid/``."""
    import deid_data
    from pydicom.data import get_testdata_file

    source = root / "source"
    if not source.is_dir():
        shutil.copytree(Path(get_testdata_file("CT_small.dcm")).parent, source / "pydicom")
        shutil.copytree(Path(deid_data.__file__).parent / "data", source / "deid",
                        ignore=shutil.ignore_patterns("__pycache__", "*.py", "*.md"))
    return source


def run_stages(root: Path) -> tuple[Path, Path, Path]:
    """(source, ingest folder, anonymize folder); stages already run in ``root`` are reused."""
    from haven.deid.anonymize import anonymize
    from haven.ingest import ingest

    source = make_source(root)
    ingest_dir, out = root / "ingest", root / "anon"
    if not (ingest_dir / "identifiers.csv").is_file():
        ingest(source, ingest_dir)
    if not (out / "anonymization.log.csv").is_file():
        anonymize(source, ingest_dir / "manifest.csv", KEY, data=out / "data", manifest=out / "manifest.csv",
                  log_csv=out / "anonymization.log.csv", quarantine=out / "quarantine.csv")
    return source, ingest_dir, out


def precision(ingest_dir: Path, out: Path) -> dict:
    from haven.deid.audit import audit

    t0 = time.perf_counter()
    result = audit([out / "data"], out / "manifest.csv", out / "anonymization.log.csv",
                   ingest_dir / "identifiers.csv", ingest_dir / "manifest.csv", key=KEY)
    print(f"anonymized output: {result['files']} files, {len(result['findings'])} finding(s) "
          f"(all false: both corpora are test data) in {time.perf_counter() - t0:.1f}s")
    for f in result["findings"]:
        print(f"  FALSE  {f['file']}: {f['where']} ({f['kind']})")
    return result


def recall(source: Path, ingest_dir: Path, baseline: Path | None) -> int:
    """The audit of the *originals* (every identifier ingest recorded is still there): its
    (file, place, kind) findings, compared with a baseline saved by an earlier run (``--baseline``:
    written when missing, else every baseline finding must still be found).  Returns the number
    missed."""
    import json

    from haven.deid.audit import audit_tree

    import warnings

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom on the test files' deliberately bad values
        result = audit_tree(source, ingest_dir / "identifiers.csv", ocr=False)
    found = sorted({(f["file"], f["where"], f["kind"]) for f in result["findings"]})
    print(f"originals: {result['files']} files, {len(found)} finding(s) (file, place, kind) "
          f"in {time.perf_counter() - t0:.1f}s")
    if baseline is None:
        return 0
    if not baseline.is_file():
        baseline.write_text(json.dumps(found))
        print(f"  baseline written to {baseline}")
        return 0
    before = {tuple(f) for f in json.loads(baseline.read_text())}
    missed = sorted(before - set(found))
    print(f"  baseline: {len(before)} finding(s); {len(missed)} no longer found, "
          f"{len(set(found) - before)} new")
    for f, w, k in missed[:40]:
        print(f"  MISSED {f}: {w} ({k})")
    return len(missed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="work folder (kept; reused by a second run)")
    ap.add_argument("--no-recall", action="store_true", help="skip the audit of the originals")
    ap.add_argument("--baseline", type=Path, help="the originals' findings (JSON, no values): written when "
                    "missing, else compared (recall: none may be lost)")
    args = ap.parse_args(argv)
    root = args.work or Path(tempfile.mkdtemp(prefix="haven-audit-precision-"))
    root.mkdir(parents=True, exist_ok=True)
    source, ingest_dir, out = run_stages(root)
    result = precision(ingest_dir, out)
    kinds = Counter(f["kind"] for f in result["findings"])
    if kinds:
        print("false findings by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    missed = 0
    if not args.no_recall:
        missed = recall(source, ingest_dir, args.baseline)
    if args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if result["findings"] or missed else 0


if __name__ == "__main__":
    sys.exit(main())
