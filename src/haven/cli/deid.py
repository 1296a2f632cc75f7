"""haven anonymize and haven audit: the safe haven's de-identification and its gate."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from haven.cli.common import settings, stage_args

log = logging.getLogger("haven")


def _key(s: dict) -> bytes:
    from haven.keys import create_key, load_key

    if s.get("demo_key") and s.get("key_file") and not (s.get("key_env") and os.environ.get(s["key_env"])):
        create_key(s["key_file"])
    return load_key(s.get("key_file"), s.get("key_env"))


def cmd_anonymize(args) -> int:
    from haven.deid.anonymize import anonymize
    from haven.shards import parse_shard

    s = settings(args)
    summary = anonymize(Path(args.source), Path(args.ingest), Path(args.out), _key(s), s.get("anonymize", {}),
                        shard=parse_shard(args.shard), data_dir=Path(args.data) if args.data else None)
    print(json.dumps(summary))
    return 0


def cmd_audit(args) -> int:
    from haven.deid.audit import audit, write_audit_result

    anon = Path(args.anonymized)
    s = settings(args)
    options = s["anonymize"]
    pixels = options.get("pixels") or {}
    result = audit(anon, Path(args.ingest), ocr_modalities=pixels.get("modalities"),
                   ocr=pixels.get("clean", "auto") != "off",
                   clean_descriptors=bool(options.get("clean_descriptors")),
                   retain_uids=bool(options.get("retain_uids")),
                   safe_private=options.get("safe_private") or None,
                   deface=options.get("deface") or None)
    passed = result["passed"]
    target = anon / ("audit.json" if passed else "audit.failed.json")
    (anon / ("audit.failed.json" if passed else "audit.json")).unlink(missing_ok=True)
    write_audit_result(result, target)
    if not passed:
        for f in result["findings"][:50]:
            print(f"LEAK {f['file']}: {f['where']} ({f.get('kind', '')})", file=sys.stderr)
        print(f"audit FAILED: {len(result['findings'])} finding(s) in {result['files']} file(s); "
              f"details (without values) in {target}", file=sys.stderr)
        return 1
    print(f"audit passed: {result['files']} file(s), 0 findings")
    return 0


def cmd_merge(args) -> int:
    from haven import shards

    print(json.dumps(shards.merge_anonymize([Path(d) for d in args.shards], Path(args.out))))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("anonymize", help="de-identify every ingested file (keyed pseudonyms, date shifts)")
    p.add_argument("source")
    p.add_argument("ingest", help="the ingest stage's output folder")
    p.add_argument("out")
    p.add_argument("--shard", help="I/N: only the inputs of shard I of N (merge the shards with `haven merge`)")
    p.add_argument("--data", help="folder for the de-identified files (default: OUT/data)")
    stage_args(p)
    p.set_defaults(func=cmd_anonymize)
    p = sub.add_parser("audit", help="re-scan anonymized output for any original identifier; exit 1 on a leak")
    p.add_argument("anonymized")
    p.add_argument("--ingest", required=True, help="the ingest stage's output folder (identifiers seen)")
    stage_args(p)  # optional: anonymize.pixels.modalities are the files whose pixel text is read (OCR)
    p.set_defaults(func=cmd_audit)

