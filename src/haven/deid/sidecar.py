"""JSON sidecars of NIfTI volumes (BIDS, dcm2niix): which keys identify, and the cleaned copy.

The actions are data (``data/bids_sidecar.csv``, like the PS3.15 table): ``remove`` (a person, a
site, a device; the value is recorded at ingest so that the audit looks for it), ``shift`` (dates
and date-times, moved by the subject's day shift as DICOM dates are), ``drop`` (removed, not
recorded: times of day, which the shifted date-times keep), ``keep`` (converter keys that
identify nobody).  A key the table does not list is kept when the BIDS schema defines it (its
metadata are acquisition parameters: RepetitionTime, EchoTime, ...; the schema's identifying keys,
InstitutionName and the like, are in the table) and dropped otherwise: what a converter or a site
adds under a name of its own is unknown, so it does not pass.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import re
from importlib import resources

_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")


@functools.lru_cache(maxsize=1)
def actions() -> dict[str, str]:
    """key -> remove | shift | drop | keep, from ``data/bids_sidecar.csv``."""
    text = resources.files("haven.deid").joinpath("data/bids_sidecar.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    return {r["key"]: r["action"] for r in rows}


@functools.lru_cache(maxsize=1)
def schema_keys() -> frozenset[str]:
    """The metadata keys the BIDS schema defines (bidsschematools, shipped with pybids)."""
    from bidsschematools import schema

    return frozenset(str(v["name"]) for v in schema.load_schema().objects.metadata.values())


def action(key: str) -> str:
    """What anonymize does with ``key``: the table's action, else keep (BIDS) or drop."""
    found = actions().get(key)
    if found:
        return found
    return "keep" if key in schema_keys() else "drop"


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif value is not None and str(value).strip():
        yield str(value).strip()


def identifiers(meta: dict) -> list[tuple[str, str]]:
    """(kind, value) of a sidecar's identifying values, for ingest's identifiers table: the removed
    and shifted keys' values (a date also as ``YYYYMMDD``, the form the audit compares dates in)."""
    out = []
    for key, value in meta.items():
        if action(key) not in ("remove", "shift"):
            continue
        for text in _strings(value):
            m = _DATE.match(text) if action(key) == "shift" else None
            if m:
                out.append((f"sidecar.{key}.date", "".join(m.groups())))
                if len(text) > 10:
                    out.append((f"sidecar.{key}.text", text))
            else:
                out.append((f"sidecar.{key}", text))
    return out


def compact_date(text: str) -> str | None:
    """``YYYYMMDD`` of a text that starts with a date (``2019-03-04T10:22``), else None."""
    m = _DATE.match(text.strip())
    return "".join(m.groups()) if m else None


def shift_date(text: str, days: int) -> str | None:
    """An ISO date or date-time (``2019-03-04``, ``2019-03-04T10:22:33.5``; ``20190304``) moved
    by ``days``, in its own format; None when it is not one."""
    m = _DATE.match(text.strip())
    if not m:
        return None
    try:
        day = dt.date(*(int(g) for g in m.groups())) + dt.timedelta(days=days)
    except ValueError:
        return None
    dash = "-" in m.group(0)
    new = day.strftime("%Y-%m-%d" if dash else "%Y%m%d")
    return new + text.strip()[m.end():]


def clean(meta: dict, days: int | None) -> tuple[dict, int]:
    """(the cleaned sidecar, keys changed): removed and unknown keys dropped, dates moved by
    ``days`` (None: dates removed too)."""
    out, changed = {}, 0
    for key in sorted(meta):
        what = action(key)
        if what == "keep":
            out[key] = meta[key]
            continue
        changed += 1
        if what == "shift" and days is not None and isinstance(meta[key], str):
            moved = shift_date(meta[key], days)
            if moved is not None:
                out[key] = moved
    return out, changed
