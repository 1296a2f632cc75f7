"""The ingest shards' tables merged into the stage's outputs, as one unsharded ingest writes them."""

from __future__ import annotations

import heapq
import logging
from pathlib import Path

from haven.ingest.labels import Labels
from haven.ingest.tables import IDENTIFIER_COLUMNS, MANIFEST_COLUMNS, QUARANTINE_COLUMNS, Tables
from haven.io import atomic_write_text, csv_text, read_rows, write_rows

log = logging.getLogger(__name__)


def merge_ingest(shards: list[Path | Tables], out: Path | Tables, labels: Path | None = None,
                 label_key: str | None = None, label_column: str | None = None) -> dict:
    """The ingest shards' manifests, identifiers and quarantine lists (:class:`Tables`, or their
    folders) as one of each in ``out``, sorted by path.  A SOPInstanceUID seen in two shards keeps
    its first file (in path order) and the other is quarantined, exactly as one unsharded ingest
    would.  With the ``labels`` table, its rows that no accepted file matched are counted
    (``unmatched_label_rows``: a wrong ``label_key`` or missing files show up here)."""
    shards, out = [Tables.of(s) for s in shards], Tables.of(out)
    for s in shards:
        for f in (s.manifest, s.identifiers, s.quarantine):
            if not Path(f).is_file():
                raise FileNotFoundError(f"{f} missing: re-run the ingest shard that writes it")
    late: list[dict] = []  # duplicates across shards
    labeller = None
    if labels is not None:
        if label_column is None:
            from haven.config import section_defaults

            label_column = section_defaults("label_column")
        labeller = Labels(labels, label_key, label_column)
    kept_patients: set[str] = set()
    used_keys: set[str] = set()

    def accepted():
        seen: dict[str, str] = {}
        for row in heapq.merge(*(read_rows(s.manifest) for s in shards), key=lambda r: r["path"]):
            sop = row.get("sop_uid", "")
            if sop and sop in seen:
                late.append({"path": row["path"], "reason": f"duplicate: same SOPInstanceUID as {seen[sop]}"})
                continue
            if sop:
                seen[sop] = row["path"]
            if row.get("role") != "mask":  # a patient counts by their samples, not by a segmentation
                kept_patients.add(row["patient_id"])
            if labeller is not None:
                used_keys.add(labeller.key(row))
            yield row

    n = write_rows(out.manifest, MANIFEST_COLUMNS, accepted())
    write_rows(out.identifiers, IDENTIFIER_COLUMNS, (r for s in shards for r in read_rows(s.identifiers)))
    quarantine = sorted([*(r for s in shards for r in read_rows(s.quarantine)), *late], key=lambda r: r["path"])
    atomic_write_text(out.quarantine, csv_text(QUARANTINE_COLUMNS, quarantine))
    summary = {"shards": len(shards), "accepted": n, "quarantined": len(quarantine),
               "duplicates_across_shards": len({r["path"] for r in late}), "patients": len(kept_patients)}
    if labeller is not None:
        summary["unmatched_label_rows"] = len(set(labeller.table) - used_keys)
        if summary["unmatched_label_rows"]:
            log.warning("%s: %d of its %d rows match no accepted file by %s (check label_key, or the files' "
                        "quarantine reasons)", labeller.name, summary["unmatched_label_rows"], len(labeller.table),
                        labeller.key_field)
    return summary
