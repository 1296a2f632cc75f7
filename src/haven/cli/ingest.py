"""haven ingest: a source folder → manifest, identifiers, quarantine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from haven.cli.common import settings, stage_args

log = logging.getLogger("haven")


def _labels(s: dict) -> dict:
    return {"labels": Path(s["labels"]) if s["labels"] else None, "label_key": s["label_key"],
            "label_column": s["label_column"]}


def cmd_ingest(args) -> int:
    from haven.ingest import Tables, ingest
    from haven.shards import parse_shard

    out = Tables(Path(args.manifest), Path(args.identifiers), Path(args.quarantine))
    s = settings(args)
    # labels are needed only from preprocess on: a de-identification-only project goes without
    summary = ingest(Path(args.source), out, **_labels(s), shard=parse_shard(args.shard),
                     # a segmentation learns from masks: a label (table or folder) is optional there
                     labels_required=s["until"] != "audit" and s.get("masks") is None,
                     label_folders=not s["unlabeled"],
                     segmentation=_segmentation(s.get("masks")))
    print(json.dumps(summary))
    return 0


def _segmentation(masks: dict | None) -> dict | None:
    """The stage settings' ``masks`` (haven.config.mask_files) as ingest takes them."""
    return None if masks is None else {"masks": masks["folder"], "mask_suffix": masks["suffix"]}


def cmd_merge(args) -> int:
    """`haven merge ingest`: the shards' tables, given file by file, as the stage's three tables."""
    from haven.ingest import Tables, merge_ingest

    given = (args.shard_manifests, args.shard_identifiers, args.shard_quarantines)
    if len({len(g) for g in given}) != 1:
        raise ValueError("haven merge ingest: give one manifest, identifier table and quarantine list per shard")
    shards = [Tables(Path(m), Path(i), Path(q)) for m, i, q in zip(*given)]
    out = Tables(Path(args.manifest), Path(args.identifiers), Path(args.quarantine))
    summary = merge_ingest(shards, out, **_labels(settings(args, "ingest")))
    print(json.dumps(summary))
    return 0


def _tables_args(p) -> None:
    """The three tables the stage writes (and its merge writes from the shards' ones)."""
    p.add_argument("--manifest", required=True, help="the manifest to write (CSV)")
    p.add_argument("--identifiers", required=True, help="the identifiers seen in the accepted files, for the audit (CSV)")
    p.add_argument("--quarantine", required=True, help="the files not accepted and why (CSV)")


def add_merge_command(stages) -> None:
    """`haven merge ingest`: every file named, the shards' tables in shard order."""
    p = stages.add_parser("ingest", help="the ingest shards' tables as one manifest, identifier table and quarantine list")
    _tables_args(p)
    p.add_argument("--shard-manifests", nargs="+", required=True, help="the shards' manifests")
    p.add_argument("--shard-identifiers", nargs="+", required=True, help="the shards' identifier tables, in the same order")
    p.add_argument("--shard-quarantines", nargs="+", required=True, help="the shards' quarantine lists, in the same order")
    p.add_argument("--params", help="the label settings as JSON (to count label rows no file matched)")
    p.add_argument("--config", help="config file (instead of --params)")
    p.add_argument("--project", help="project name in the config (with --config)")
    p.set_defaults(func=cmd_merge)


def add_commands(sub) -> None:
    p = sub.add_parser("ingest", help="walk a source folder into a manifest; quarantine unreadable files")
    p.add_argument("source")
    _tables_args(p)
    p.add_argument("--shard", help="I/N: only the files of shard I of N (merge the shards with `haven merge`)")
    stage_args(p)
    p.set_defaults(func=cmd_ingest)
