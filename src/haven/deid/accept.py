"""The audit's accept list: findings a person responsible for the data has cleared as not PHI.

The audit fails closed: any original identifier found in an output stops the pipeline.  When a
finding is a value that identifies nobody (a coded term that happens to equal another patient's
junk value), the reviewer clears it in the project's config (``audit.accept``, the schema says
the format).  An entry names the value only by its keyed hash - HMAC-SHA256 under the project's
pseudonymization key, so the config (often in version control) never holds the value and nobody
without the key can confirm a guess - and the place it was found in (the finding's ``where``).
A finding is accepted when every value that made it has an entry for its place: the same value
anywhere else, another value at the same place, a hash under another key, or a finding that is
no value at all (a missing or unreadable file) still fails.

``haven audit --review`` (:func:`review_rows`) is the one place the values are shown: on the
reviewer's terminal in the PHI zone, with the line to paste for each.  The audit's result and
its log carry places, reasons and who accepted - never a value or its hash.
"""

from __future__ import annotations

import datetime as dt
import json
import re

from haven import keys
from haven.config import ConfigError

PURPOSE = "audit-accept"  # domain separation: an accept hash is no pseudonym, UID or date shift
REASON_TODO = "<why this value is not PHI>"
WHO_TODO = "<your name>"
FIELDS = ("value_hmac", "place", "reason", "accepted_by", "accepted_on")
_HEX = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
SHOWN_CHARS = 200  # a value longer than this (a metadata block) is shown cut, its hash is of all of it


def value_hash(key: bytes, value: str) -> str:
    """The keyed hash an accept entry names a value by."""
    return keys.digest(key, PURPOSE, value).hex()


def check_entries(entries: list | None, key: bytes | None = b"") -> list[dict]:
    """The accept list, checked entry by entry (the schema checks a validated config; this catches
    what the audit is given by hand): a malformed entry is an error naming its key and the fix.
    ``key=None``: no key to check the hashes with, an error when there are entries."""
    entries = entries or []
    if entries and key is None:
        raise ConfigError("audit.accept needs the project key to check its hashes: set key_file or key_env "
                          "in the config (the key anonymize used)")
    if not isinstance(entries, list):
        raise ConfigError("audit.accept must be a list of entries, each as `haven audit --review` prints it")
    for i, e in enumerate(entries):
        where = f"audit.accept[{i}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{where} must be a mapping with {', '.join(FIELDS[:4])}; paste the line "
                              f"`haven audit --review` prints for the finding")
        unknown = set(e) - set(FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(FIELDS)})")
        if not isinstance(e.get("value_hmac"), str) or not _HEX.fullmatch(e["value_hmac"]):
            raise ConfigError(f"{where}.value_hmac must be the 64 lower-case hex digits `haven audit --review` "
                              f"prints for the finding (the keyed hash of the value, never the value itself)")
        for field, todo in (("place", None), ("reason", REASON_TODO), ("accepted_by", WHO_TODO)):
            value = e.get(field)
            if not isinstance(value, str) or not value.strip() or value.strip() == todo:
                fix = f"replace {todo!r} with it" if todo else "copy it from the line `haven audit --review` prints"
                raise ConfigError(f"{where}.{field} is missing or empty: give the {field.replace('_', ' ')} "
                                  f"({fix})")
        on = e.get("accepted_on")
        if on is not None and not (isinstance(on, str) and _DATE.fullmatch(on)):
            raise ConfigError(f"{where}.accepted_on must be a quoted date 'YYYY-MM-DD' (or left out)")
    return entries


def apply(findings: list[dict], entries: list | None, key: bytes | None) -> tuple[list[dict], dict]:
    """(the findings not accepted, the record of what was): ``findings`` carry their ``values``;
    the record holds counts, places, reasons and who - no value, no hash."""
    entries = check_entries(entries, key)
    record = {"count": 0, "entries": [], "unused": 0}
    if not entries:
        return findings, record
    index = {(e["value_hmac"], e["place"]): i for i, e in enumerate(entries)}
    used = [0] * len(entries)
    remaining = []
    for f in findings:
        values = f.get("values") or [None]
        hits = [None if v is None else index.get((value_hash(key, v), f["where"])) for v in values]
        if any(h is None for h in hits):
            remaining.append(f)
            continue
        for h in set(hits):
            used[h] += 1
        record["count"] += 1
    for e, n in zip(entries, used):
        if n:
            record["entries"].append({**{k: e[k] for k in ("place", "reason", "accepted_by")},
                                      **({"accepted_on": e["accepted_on"]} if e.get("accepted_on") else {}),
                                      "findings": n})
    record["unused"] = used.count(0)
    return remaining, record


def acceptance_line(key: bytes, where: str, value: str) -> str:
    """The config line that accepts ``value`` at ``where`` (YAML: a JSON flow mapping)."""
    entry = {"value_hmac": value_hash(key, value), "place": where, "reason": REASON_TODO,
             "accepted_by": WHO_TODO, "accepted_on": dt.date.today().isoformat()}
    return "- " + json.dumps(entry, ensure_ascii=False)


def review_rows(findings: list[dict], key: bytes) -> list[dict]:
    """One row per (finding, value) for the reviewer: file, place, kind, the value as shown and
    the line that accepts it (None for a finding that is no value: it cannot be accepted)."""
    rows = []
    for f in findings:
        for v in f.get("values") or [None]:
            shown = None if v is None else (v if len(v) <= SHOWN_CHARS else v[:SHOWN_CHARS] + "...")
            rows.append({"file": f["file"], "where": f["where"], "kind": f["kind"], "value": shown,
                         "line": None if v is None else acceptance_line(key, f["where"], v)})
    return rows
