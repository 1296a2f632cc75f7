"""BIDS datasets: the entities in a file's name, its sidecar metadata, its subject's row.

A BIDS dataset is a folder holding ``dataset_description.json``; its raw data lie in
``sub-<label>[/ses-<label>]/<datatype>/`` named ``sub-<label>[_ses-<label>][_<entity>-<value>...]_<suffix>``.
Entities are parsed by the BIDS schema's entity keys (bidsschematools, shipped with pybids).  Sidecar metadata follow the *inheritance principle*: every ``.json`` on the way from
the dataset root down to the file's folder whose entities are a subset of the file's and whose
suffix is the file's applies, deeper ones overriding.  That walk is done here, with each folder
listed once, rather than by a pybids ``BIDSLayout``: a layout indexes the whole dataset into a
database, which an ingest shard reading a slice of the files would rebuild per job.

Only raw data are samples: ``derivatives/``, ``sourcedata/`` and ``code/`` of a dataset are not
walked, and its metadata files (sidecars, tables, README...) are read through the volumes they
describe, never ingested as files of their own (:func:`is_companion`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path, PurePosixPath

DESCRIPTION = "dataset_description.json"
# folders of a BIDS dataset that are not raw data (BIDS 1.9, "The derivatives and sourcedata folders")
NOT_RAW = frozenset({"derivatives", "sourcedata", "code", "stimuli", "phenotype"})
_META_SUFFIXES = (".json", ".tsv", ".tsv.gz", ".bval", ".bvec")
_META_NAMES = ("readme", "changes", "license", "citation.cff", ".bidsignore")
VOLUME_SUFFIXES = (".nii.gz", ".nii")


def volume_suffix(name: str) -> str:
    """``.nii.gz`` or ``.nii`` (lower case) when ``name`` is a NIfTI file's, else ""."""
    low = name.lower()
    return next((s for s in VOLUME_SUFFIXES if low.endswith(s)), "")


def stem(name: str) -> str:
    """The name without its (double) extension: ``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    cut = volume_suffix(name) or (".tsv.gz" if name.lower().endswith(".tsv.gz") else PurePosixPath(name).suffix)
    return name[: len(name) - len(cut)] if cut else name


def is_root(folder: Path) -> bool:
    return (folder / DESCRIPTION).is_file()


def is_companion(name: str, folder_names: frozenset[str] | set[str], in_bids: bool) -> bool:
    """Whether the file ``name`` (in a folder listing ``folder_names``) is metadata read through the
    volumes it describes: anything of a BIDS dataset's metadata kinds, and outside BIDS the JSON
    sidecar a converter (dcm2niix) writes beside a volume of the same stem."""
    low = name.lower()
    if in_bids and (low.endswith(_META_SUFFIXES) or low.split(".")[0] in _META_NAMES or low in _META_NAMES):
        return True
    if low.endswith(".json"):
        base = name[:-5]
        return any(base + s in folder_names for s in (".nii", ".nii.gz", ".NII", ".NII.GZ"))
    return False


@functools.lru_cache(maxsize=1)
def _entity_names() -> tuple[dict[str, str], frozenset[str]]:
    """(short key -> entity name, the entities whose labels are indices), from the BIDS schema
    (bidsschematools, which pybids ships): ``ses`` -> ``session``, ``run`` an index."""
    from bidsschematools import schema

    found = schema.load_schema().objects.entities
    names = {str(v["name"]): str(k) for k, v in found.items()}
    return names, frozenset(str(k) for k, v in found.items() if v.get("format") == "index")


@functools.lru_cache(maxsize=65536)
def entities(name: str) -> dict:
    """The BIDS entities of a file name: ``subject``, ``session``, ``acquisition``, ``run`` (an
    index: ``01`` and ``1`` are one run), ..., ``suffix`` and ``extension``; {} for a name that has
    no suffix.  Parsed here by the schema's key names rather than by pybids' path patterns, which
    take ~1 ms a name (ingest parses every volume's and every sidecar's)."""
    names, indices = _entity_names()
    base = stem(name)
    extension = name[len(base):]
    pieces = base.split("_")
    out: dict[str, str] = {}
    for piece in pieces[:-1]:
        key, sep, label = piece.partition("-")
        if not sep or key not in names:
            return {}
        entity = names[key]
        out[entity] = str(int(label)) if entity in indices and label.isdigit() else label
    if not pieces[-1] or "-" in pieces[-1]:
        return {}
    out["suffix"] = pieces[-1]
    out["extension"] = extension
    return out


def root_of(path: Path, source: Path) -> Path | None:
    """The BIDS dataset root holding ``path`` (the nearest folder up to ``source`` with a
    ``dataset_description.json``), or None."""
    path, source = Path(path).absolute(), Path(source).absolute()  # not resolved: links stay where they lie
    for folder in path.parents:
        if is_root(folder):
            return folder
        if folder == source or not folder.is_relative_to(source):
            break
    return None


@functools.lru_cache(maxsize=4096)
def _listing(folder: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))
    except OSError:
        return ()


@functools.lru_cache(maxsize=16384)
def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"sidecar {path.name} is not readable JSON ({type(e).__name__}): fix or remove it") from None
    if not isinstance(value, dict):
        raise ValueError(f"sidecar {path.name} is not a JSON object: fix or remove it")
    return value


def sidecar(path: Path, root: Path | None) -> dict:
    """The metadata of the volume at ``path``: the inheritance principle from ``root`` down (BIDS),
    or, outside a dataset, the ``<stem>.json`` beside it.  Raises ValueError for a bad sidecar."""
    path = Path(path).absolute()
    if root is None:
        beside = path.with_name(stem(path.name) + ".json")
        return dict(_read_json(beside)) if beside.is_file() else {}
    mine = entities(path.name)
    suffix = mine.get("suffix")
    wanted = {k: v for k, v in mine.items() if k not in ("suffix", "extension")}
    folders = [f for f in reversed(path.parents) if f == root or f.is_relative_to(root)]
    merged: dict = {}
    for folder in folders:
        for name in _listing(folder):
            if not name.endswith(".json") or name == DESCRIPTION:
                continue
            theirs = entities(name)
            if theirs.get("suffix") != suffix:
                continue
            rest = {k: v for k, v in theirs.items() if k not in ("suffix", "extension")}
            if all(wanted.get(k) == v for k, v in rest.items()):
                merged.update(_read_json(folder / name))
    return merged


# participants.tsv columns that name or date a person (matched on the lower-case column name)
_IDENTIFYING_COLUMN = re.compile(r"name|mrn|record|birth|dob|address|phone|email|mail|ssn|nhs|insurance|"
                                 r"accession|patient_?id|contact|initials")


def identifying_columns(rows: list[dict]) -> frozenset[str]:
    """The columns of a participants table whose values identify a person: by name (names,
    record numbers, birth dates, addresses...), or a text column whose every value is unique
    among five or more participants (an id the site added); never participant_id (the manifest's
    own key), sex/age, or a column that repeats values (a group, a diagnosis: labels)."""
    out = set()
    columns = rows[0].keys() if rows else ()
    for column in columns:
        if column == "participant_id" or column.lower() in ("sex", "gender", "age", "site"):
            continue
        values = [r[column] for r in rows if r[column]]
        numeric = all(is_number(v) for v in values)
        unique = len(values) >= 5 and len(set(values)) == len(values) and not numeric
        if _IDENTIFYING_COLUMN.search(column.lower()) or unique:
            out.add(column)
    return frozenset(out)


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a number (a table cell, a header value)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def participants(root: Path) -> tuple[dict[str, dict[str, str]], frozenset[str]]:
    """``participants.tsv`` of a dataset: (participant_id -> its row, "n/a" as empty; its
    identifying columns); ({}, {}) without one."""
    import pandas as pd

    table = root / "participants.tsv"
    if not table.is_file():
        return {}, frozenset()
    try:
        df = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
    except Exception as e:
        raise ValueError(f"{table.name} of the BIDS dataset cannot be read ({type(e).__name__}): "
                         "fix it (tab-separated, a participant_id column)") from None
    if "participant_id" not in df.columns:
        raise ValueError(f"{table.name} of the BIDS dataset has no participant_id column: add it")
    rows = [{str(k).strip(): str(v).strip() for k, v in r.items()} for r in df.replace({"n/a": ""}).to_dict("records")]
    return {r["participant_id"]: r for r in rows}, identifying_columns(rows)
