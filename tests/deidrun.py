"""The anonymize and audit stages run on one folder each, laid out as the rules lay out theirs:
``OUT/data/``, ``OUT/manifest.csv``, ``OUT/anonymization.log.csv``, ``OUT/quarantine.csv`` and the
ingest stage's ``INGEST/manifest.csv`` and ``INGEST/identifiers.csv``."""

from __future__ import annotations

from pathlib import Path

from haven.deid.anonymize import ShardTables, anonymize, merge
from haven.deid.audit import audit


def anonymize_into(source, ingest, out, key, options=None, shard=(0, 1), data=None) -> dict:
    out = Path(out)
    return anonymize(source, Path(ingest) / "manifest.csv", key, data=Path(data) if data else out / "data",
                     manifest=out / "manifest.csv", log_csv=out / "anonymization.log.csv",
                     quarantine=out / "quarantine.csv", options=options, shard=shard)


def merge_into(shard_dirs, out) -> dict:
    out = Path(out)
    shards = [ShardTables(Path(d).name, Path(d) / "manifest.csv", Path(d) / "anonymization.log.csv",
                          Path(d) / "quarantine.csv") for d in shard_dirs]
    return merge(shards, manifest=out / "manifest.csv", log_csv=out / "anonymization.log.csv",
                 quarantine=out / "quarantine.csv")


def audit_of(out, ingest, key=None, **kw) -> dict:
    out, ingest = Path(out), Path(ingest)
    return audit([out / "data"], out / "manifest.csv", out / "anonymization.log.csv", ingest / "identifiers.csv",
                 ingest / "manifest.csv", key=key, **kw)
