"""Shards: a cohort of 100,000 files is ingested and anonymized by a few jobs, not one per file.

A project's files are dealt into ``n`` shards by a keyed-free, stable hash of their path relative
to the source folder (:func:`shard_of`), so every job knows its files without a shared list and
the same file always lands in the same shard (anonymize hashes a DICOM file's series instead of its
path, so a series stays in one job: ``haven.deid.anonymize._shard_key``).  ``n`` is the project's ``shards`` setting, or
``ceil(files / files_per_shard)`` counted when the DAG is built (:func:`shard_count`); each shard
job holds at most about ``files_per_shard`` files in memory, whatever the cohort's size.

Each stage merges its shards' tables into its usual outputs (:func:`haven.ingest.merge_ingest`
and anonymize's merge), in a fixed order, so the result does not depend on how many shards ran.
A DICOMweb source (``dicomweb://...``, :mod:`haven.fetch`) is not counted: asking the PACS while
the DAG is built would query it on every `snakemake -n`, so it runs as ``shards`` jobs (1 unset).
This module only deals and counts: it imports no stage.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

# sources that are a server, not a folder (haven.fetch retrieves them into the PHI zone first)
REMOTE_SCHEMES = ("dicomweb://", "dicomwebs://")


def remote_source(source) -> bool:
    """Whether ``source`` is a DICOMweb URL rather than a folder."""
    return str(source).startswith(REMOTE_SCHEMES)


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
    if remote_source(project["source"]):
        return 1  # never counted on the server at DAG-build time (see the module docstring)
    files = count_files(project["source"]) if not project.get("demo") else None
    if not files:
        return 1
    return max(1, math.ceil(files / int(project["files_per_shard"])))
