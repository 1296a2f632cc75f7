"""haven ingest: a source folder → manifest, identifiers, quarantine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from haven.cli.common import settings, stage_args

log = logging.getLogger("haven")


def cmd_ingest(args) -> int:
    from haven.ingest import ingest
    from haven.shards import parse_shard

    s = settings(args)
    summary = ingest(Path(args.source), Path(args.out), labels=Path(s["labels"]) if s["labels"] else None,
                     label_key=s["label_key"], label_column=s["label_column"],
                     shard=parse_shard(args.shard))
    print(json.dumps(summary))
    return 0


def cmd_merge(args) -> int:
    from haven import shards

    s = settings(args, "ingest")
    summary = shards.merge_ingest([Path(d) for d in args.shards], Path(args.out),
                                  labels=Path(s["labels"]) if s["labels"] else None,
                                  label_key=s["label_key"], label_column=s["label_column"])
    print(json.dumps(summary))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("ingest", help="walk a source folder into a manifest; quarantine unreadable files")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--shard", help="I/N: only the files of shard I of N (merge the shards with `haven merge`)")
    stage_args(p)
    p.set_defaults(func=cmd_ingest)

