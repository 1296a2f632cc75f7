"""Shards: a cohort of 100,000 files is ingested and anonymized by a few jobs, not one per file.

A project's files are dealt into ``n`` shards by a keyed-free, stable hash of their path relative
to the source folder (:func:`shard_of`), so every job knows its files without a shared list and
the same file always lands in the same shard (anonymize hashes a DICOM file's series instead of its
path, so a series stays in one job: ``haven.deid.anonymize._shard_key``).  ``n`` is the project's ``shards`` setting, or
``ceil(files / files_per_shard)`` counted when the DAG is built (:func:`shard_count`); each shard
job holds at most about ``files_per_shard`` files in memory, whatever the cohort's size.

The per-shard tables are merged by :func:`merge_ingest` and :func:`merge_anonymize` into the
stage's usual outputs, in a fixed order, so the result does not depend on how many shards ran.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
from pathlib import Path

from haven.io import atomic_write_text, csv_text, read_rows, write_rows


def shard_of(rel_path: str, n: int) -> int:
    """The shard (0..n-1) of a file, from its path relative to the source folder."""
    if n <= 1:
        return 0
    digest = hashlib.blake2b(rel_path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)``; None → ``(0, 1)``."""
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: give it as I/N, e.g. 3/8") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def count_files(source: str | os.PathLike) -> int | None:
    """Files below ``source`` (hidden names skipped, as ingest does); None when it does not exist yet."""
    source = Path(source)
    if not source.is_dir():
        return None
    count = 0
    for _dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += sum(1 for f in filenames if not f.startswith("."))
    return count


def shard_count(project: dict) -> int:
    """The project's number of shards: ``shards`` if set, else files / ``files_per_shard``
    (1 while the source does not exist yet, e.g. a demo still to be generated)."""
    if project.get("shards"):
        return int(project["shards"])
    files = count_files(project["source"]) if not project.get("demo") else None
    if not files:
        return 1
    return max(1, math.ceil(files / int(project.get("files_per_shard") or 5000)))


# ---------------------------------------------------------------------------------------------
# merging the shards' tables


def merge_ingest(shard_dirs: list[Path], out_dir: Path, labels: Path | None = None, label_key: str | None = None,
                 label_column: str = "label") -> dict:
    """The ingest shards' manifests, identifiers and quarantine lists as one of each, sorted by
    path.  A SOPInstanceUID seen in two shards keeps its first file (in path order) and the
    other is quarantined, exactly as one unsharded ingest would.  With the ``labels`` table, its
    rows that no accepted file matched are counted (``unmatched_label_rows``: a wrong
    ``label_key`` or missing files show up here)."""
    from haven.ingest import IDENTIFIER_COLUMNS, MANIFEST_COLUMNS, QUARANTINE_COLUMNS

    shard_dirs, out_dir = [Path(d) for d in shard_dirs], Path(out_dir)
    for d in shard_dirs:
        if not (d / "manifest.csv").is_file():
            raise FileNotFoundError(f"{d / 'manifest.csv'} missing: re-run the ingest shard that writes it")
    late: list[dict] = []
    seen: dict[str, str] = {}

    def accepted():
        merged = heapq.merge(*(read_rows(d / "manifest.csv") for d in shard_dirs), key=lambda r: r["path"])
        for row in merged:
            sop = row.get("sop_uid", "")
            if sop and sop in seen:
                late.append({"path": row["path"], "reason": f"duplicate: same SOPInstanceUID as {seen[sop]}"})
                continue
            if sop:
                seen[sop] = row["path"]
            yield row

    kept_patients: set[str] = set()
    used_keys: set[str] = set()
    key_field = None
    if labels is not None:
        from haven.ingest import _load_labels, _norm_rel

        table, _, key_field = _load_labels(Path(labels), label_key, label_column)

    def tracked():
        for row in accepted():
            kept_patients.add(row["patient_id"])
            if key_field:
                used_keys.add(_norm_rel(row["path"]) if key_field == "path" else row[key_field])
            yield row

    n = write_rows(out_dir / "manifest.csv", MANIFEST_COLUMNS, tracked())
    dropped = {r["path"] for r in late}

    def identifiers():
        for d in shard_dirs:
            yield from read_rows(d / "identifiers.csv")

    write_rows(out_dir / "identifiers.csv", IDENTIFIER_COLUMNS, identifiers())
    quarantine = sorted([*(r for d in shard_dirs for r in read_rows(d / "quarantine.csv")), *late],
                        key=lambda r: r["path"])
    atomic_write_text(out_dir / "quarantine.csv", csv_text(QUARANTINE_COLUMNS, quarantine))
    summary = {"shards": len(shard_dirs), "accepted": n, "quarantined": len(quarantine),
               "duplicates_across_shards": len(dropped), "patients": len(kept_patients)}
    if key_field:
        summary["unmatched_label_rows"] = len(set(table) - used_keys)
        if summary["unmatched_label_rows"]:
            import logging

            logging.getLogger(__name__).warning(
                "%s: %d of its %d rows match no accepted file by %s (check label_key, or the files' "
                "quarantine reasons)", Path(labels).name, summary["unmatched_label_rows"], len(table), key_field)
    return summary


def merge_anonymize(shard_dirs: list[Path], out_dir: Path) -> dict:
    """The anonymize shards' tables as ``out_dir/{manifest,anonymization.log,quarantine}.csv``,
    streamed.  A shard's files live in ``data/<shard>/``: its paths get that prefix; rows are
    ordered by the input's row in ``ingest/manifest.csv`` (each shard's tables already are)."""
    from haven.deid.anonymize import LOG_COLUMNS, MANIFEST_COLUMNS, QUARANTINE_COLUMNS

    shard_dirs, out_dir = [Path(d) for d in shard_dirs], Path(out_dir)
    for d in shard_dirs:
        for name in ("manifest.csv", "anonymization.log.csv", "quarantine.csv"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} missing: re-run the anonymize shard that writes it")

    def index(row) -> int:
        return int(row["input_index"])

    def logs(d: Path):
        for row in read_rows(d / "anonymization.log.csv"):
            if row["output"]:
                row["output"] = f"{d.name}/{row['output']}"
            yield row

    def manifest(d: Path):
        # the shard's manifest lists its anonymized inputs in the order of its log
        done = (index(r) for r in read_rows(d / "anonymization.log.csv") if r["status"] == "anonymized")
        for at, row in zip(done, read_rows(d / "manifest.csv")):
            yield at, {**row, "file": f"{d.name}/{row['file']}"}

    n = write_rows(out_dir / "manifest.csv", MANIFEST_COLUMNS,
                    (row for _, row in heapq.merge(*(manifest(d) for d in shard_dirs), key=lambda t: t[0])))
    write_rows(out_dir / "anonymization.log.csv", LOG_COLUMNS,
                heapq.merge(*(logs(d) for d in shard_dirs), key=index))
    q = write_rows(out_dir / "quarantine.csv", QUARANTINE_COLUMNS,
                    heapq.merge(*(read_rows(d / "quarantine.csv") for d in shard_dirs), key=index))
    return {"shards": len(shard_dirs), "anonymized": n, "quarantined": q}
