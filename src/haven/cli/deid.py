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
                        options=s["anonymize"], shard=parse_shard(args.shard), masks=_mask_folder(s))
    print(json.dumps(summary))
    return 0


def _mask_folder(s: dict) -> Path | None:
    """A segmentation project's mask folder, where the ingest manifest's mask paths may point."""
    folder = (s.get("masks") or {}).get("folder")
    return Path(folder) if folder else None


def cmd_audit(args) -> int:
    from haven.deid.audit import gate

    s = settings(args)
    accept = s["audit"]["accept"]
    key = _audit_key(s, required=bool(accept) or args.review)
    inputs = ([Path(d) for d in args.data], Path(args.manifest), Path(args.log), Path(args.identifiers),
              Path(args.ingest_manifest))
    data_root = Path(args.data_root) if args.data_root else None
    if args.review:
        return _review(inputs, key, s, data_root)
    if not args.result:
        raise ValueError("--result is required (or --review to list the findings for a reviewer)")
    result, target = gate(*inputs, Path(args.result), options=s["anonymize"], data_root=data_root,
                          accept=accept, accept_key=key, key=key)
    # the log says how many findings the accept list cleared, never which values
    accepted = result["accepted"]["count"]
    note = f"; {accepted} finding(s) accepted as not PHI (audit.accept)" if accepted else ""
    if not result["passed"]:
        for f in result["findings"][:50]:
            print(f"LEAK {f['file']}: {f['where']} ({f.get('kind', '')})", file=sys.stderr)
        print(f"audit FAILED: {len(result['findings'])} finding(s) in {result['files']} file(s){note}; "
              f"details (without values) in {target}; a reviewer can list them with `haven audit --review`",
              file=sys.stderr)
        return 1
    print(f"audit passed: {result['files']} file(s), 0 findings{note}")
    return 0


def _audit_key(s: dict, required: bool) -> bytes | None:
    """The key anonymize used, from the settings' ``key_file``/``key_env``; load_key, not stage_key:
    the audit never creates a key (one anonymize did not use could check nothing).  Required to
    check an accept list's hashes or to review; otherwise optional: it only lets the audit tell a
    shifted date from a leak, and an audit without it is still a (stricter) audit."""
    from haven.keys import KeyError_, load_key

    try:
        return load_key(s.get("key_file"), s.get("key_env"))
    except KeyError_:
        if required:
            raise
        return None


def _review(inputs: tuple, key: bytes, s: dict, data_root: Path | None) -> int:
    """`haven audit --review`: the findings with their values, on this terminal only (the PHI zone's
    reviewer output: nothing is written, no log), each with the config line that accepts it."""
    from haven.deid.audit import review

    out = review(*inputs, key, options=s["anonymize"], data_root=data_root, accept=s["audit"]["accept"])
    print("PHI ZONE - the values below are original identifiers: review them here; copy only the "
          "acceptance lines (keyed hashes) into the config, never a value into a ticket or log.")
    for row in out["rows"]:
        print(f"\n{row['file']}\n  place: {row['where']}\n  kind:  {row['kind']}")
        if row["line"] is None:
            print("  (no value: an incomplete, unreadable or unchecked output cannot be accepted; fix it)")
            continue
        print(f"  value: {row['value']!r}")
        print(f"  to accept it as not PHI, add under the project's audit: accept: in the config:\n    {row['line']}")
    print(f"\n{len(out['rows'])} finding(s) to review in {out['files']} file(s); "
          f"{out['accepted']['count']} already accepted (audit.accept)")
    return 1 if out["rows"] else 0


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
    p.add_argument("--result",
                   help="audit.json, written when the audit passes (else NAME.failed.json beside it); "
                        "required unless --review")
    p.add_argument("--review", action="store_true",
                   help="list the findings WITH their values (for the person responsible for the data, on "
                        "the terminal) and the config line that accepts each as not PHI; writes nothing")
    stage_args(p)  # optional: anonymize.pixels.modalities are the files whose pixel text is read (OCR)
    p.set_defaults(func=cmd_audit)
