"""haven fetch: a project's studies from a PACS (DICOMweb) into the PHI zone, for ingest."""

from __future__ import annotations

import json
from pathlib import Path

from haven.cli.common import settings, stage_args


def cmd_fetch(args) -> int:
    from haven.fetch import fetch
    from haven.shards import parse_shard

    # the pacs section is part of the ingest stage's settings: the fetch is ingest's first step
    s = settings(args, "ingest")
    summary = fetch(args.source, Path(args.data), Path(args.listing), s["pacs"], shard=parse_shard(args.shard))
    print(json.dumps(summary))
    return 0


def cmd_merge(args) -> int:
    from haven.fetch import merge_fetch

    summary = merge_fetch([Path(p) for p in args.shard_listings], Path(args.listing), Path(args.data))
    print(json.dumps(summary))
    return 0


def add_merge_command(stages) -> None:
    """`haven merge fetch`: the shards' listings as one; instances none names removed."""
    p = stages.add_parser("fetch", help="the fetch shards' listings as one; fetched instances no listing names removed")
    p.add_argument("--data", required=True, help="the folder the shards fetched into")
    p.add_argument("--listing", required=True, help="the merged listing to write (CSV)")
    p.add_argument("--shard-listings", nargs="+", required=True, help="the shards' listings")
    p.set_defaults(func=cmd_merge)


def add_commands(sub) -> None:
    p = sub.add_parser("fetch", help="find a project's studies on a DICOMweb server (QIDO-RS) and retrieve "
                                     "them (WADO-RS) into the PHI zone; resumable")
    p.add_argument("source", help="the DICOMweb service, dicomweb://host:port/path (dicomwebs:// for https)")
    p.add_argument("--data", required=True, help="folder the instances are written to (created 0700)")
    p.add_argument("--listing", required=True, help="the shard's listing to write last (CSV): its done-marker")
    p.add_argument("--shard", help="I/N: only the studies of shard I of N (merge with `haven merge fetch`)")
    stage_args(p)
    p.set_defaults(func=cmd_fetch)
