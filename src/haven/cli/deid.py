"""haven anonymize and haven audit: the safe haven's de-identification and its gate."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from haven.cli.common import settings, stage_args

log = logging.getLogger("haven")


def cmd_anonymize(args) -> int:
    from haven.deid.anonymize import anonymize
    from haven.keys import stage_key
    from haven.shards import parse_shard

    s = settings(args)
    key = stage_key(s.get("key_file"), s.get("key_env"), bool(s.get("demo_key")))
    summary = anonymize(Path(args.source), Path(args.ingest_manifest), key, data=Path(args.data),
                        manifest=Path(args.manifest), log_csv=Path(args.log), quarantine=Path(args.quarantine),
                        options=s["anonymize"], shard=parse_shard(args.shard))
    print(json.dumps(summary))
    return 0


def cmd_audit(args) -> int:
    from haven.deid.audit import gate

    s = settings(args)
    result, target = gate([Path(d) for d in args.data], Path(args.manifest), Path(args.log),
                          Path(args.identifiers), Path(args.ingest_manifest), Path(args.result),
                          options=s["anonymize"], data_root=Path(args.data_root) if args.data_root else None)
    if not result["passed"]:
        for f in result["findings"][:50]:
            print(f"LEAK {f['file']}: {f['where']} ({f.get('kind', '')})", file=sys.stderr)
        print(f"audit FAILED: {len(result['findings'])} finding(s) in {result['files']} file(s); "
              f"details (without values) in {target}", file=sys.stderr)
        return 1
    print(f"audit passed: {result['files']} file(s), 0 findings")
    return 0


def cmd_merge(args) -> int:
    """`haven merge anonymize`: the shards' tables, given file by file, as the stage's three tables."""
    from haven.deid.anonymize import ShardTables, merge

    lists = (args.shard_data, args.shard_manifests, args.shard_logs, args.shard_quarantines)
    if len({len(x) for x in lists}) != 1:
        raise ValueError("haven merge anonymize: give one --shard-data, --shard-manifests, --shard-logs "
                         "and --shard-quarantines entry per shard, in the same order")
    shards = [ShardTables(Path(d).name, Path(m), Path(lg), Path(q)) for d, m, lg, q in zip(*lists)]
    print(json.dumps(merge(shards, manifest=Path(args.manifest), log_csv=Path(args.log),
                           quarantine=Path(args.quarantine))))
    return 0


def add_merge_command(stages) -> None:
    """`haven merge anonymize`: every file named, the shards' in shard order."""
    p = stages.add_parser("anonymize", help="the anonymize shards' tables as one manifest, log and quarantine list")
    p.add_argument("--manifest", required=True, help="the merged pseudonymous manifest to write")
    p.add_argument("--log", required=True, help="the merged anonymization log to write")
    p.add_argument("--quarantine", required=True, help="the merged quarantine list to write")
    p.add_argument("--shard-data", nargs="+", required=True,
                   help="the shards' data folders, in shard order (their names prefix the files' paths)")
    p.add_argument("--shard-manifests", nargs="+", required=True, help="the shards' manifests, in shard order")
    p.add_argument("--shard-logs", nargs="+", required=True, help="the shards' anonymization logs, in shard order")
    p.add_argument("--shard-quarantines", nargs="+", required=True, help="the shards' quarantine lists, in shard order")
    p.set_defaults(func=cmd_merge)


def add_commands(sub) -> None:
    p = sub.add_parser("anonymize", help="de-identify every ingested file (keyed pseudonyms, date shifts)")
    p.add_argument("source", help="the source folder the ingest manifest's paths are relative to")
    p.add_argument("--ingest-manifest", required=True, help="the ingest stage's manifest.csv")
    p.add_argument("--data", required=True, help="folder for the de-identified files")
    p.add_argument("--manifest", required=True, help="the pseudonymous manifest to write")
    p.add_argument("--log", required=True, help="the anonymization log to write (no identifiers)")
    p.add_argument("--quarantine", required=True, help="the quarantine list to write (input rows, reasons)")
    p.add_argument("--shard", help="I/N: only the inputs of shard I of N (merge the shards with `haven merge`)")
    stage_args(p)
    p.set_defaults(func=cmd_anonymize)
    p = sub.add_parser("audit", help="re-scan anonymized output for any original identifier; exit 1 on a leak")
    p.add_argument("--data", required=True, nargs="+", help="the folders of de-identified files")
    p.add_argument("--data-root", help="the folder the manifest's paths start in (default: the one --data folder)")
    p.add_argument("--manifest", required=True, help="the anonymize stage's manifest.csv")
    p.add_argument("--log", required=True, help="the anonymize stage's anonymization.log.csv")
    p.add_argument("--identifiers", required=True, help="the identifiers ingest saw (identifiers.csv)")
    p.add_argument("--ingest-manifest", required=True, help="the ingest stage's manifest.csv")
    p.add_argument("--result", required=True,
                   help="audit.json, written when the audit passes (else NAME.failed.json beside it)")
    stage_args(p)  # optional: anonymize.pixels.modalities are the files whose pixel text is read (OCR)
    p.set_defaults(func=cmd_audit)
