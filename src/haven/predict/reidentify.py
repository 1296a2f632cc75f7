"""The clinician's copy of a prediction run: ``predictions.csv`` joined back to the original ids.

The join goes *through the keyed pseudonym*, never through a table that links the two sides: for
each row of the dataset's ingest manifest (the PHI zone) the patient pseudonym and the keyed SOP
Instance UID (a DICOM file), the keyed image name (an image) or the keyed BIDS name (a volume) are recomputed with the project key,
exactly as anonymize derived them (:func:`haven.keys.pseudonym`, :func:`haven.keys.uid`), and
matched against the pseudonymous ``patient`` and file name of each prediction.  A wrong key, or a
prediction of a file this ingest never saw, matches nothing: it is counted, never guessed; two
ingest rows that give the same pseudonymous file (duplicates anonymize quarantined) are counted as
ambiguous and joined to neither.

The copy holds original identifiers, so it is written only in the PHI zone (beside the ingest
tables), with the PHI-zone writer (:func:`haven.io.write_rows`, paths as their bytes) and mode
0600.  What comes back to the caller (and the log) is counts only.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path, PurePosixPath

from haven import keys
from haven.deid.header import STANDARD_UID_ROOT
from haven.io import TEXT, read_rows, write_rows
from haven.sources import bids

log = logging.getLogger(__name__)

# the originals a clinician needs to find the study in the PACS, then every column of predictions.csv
ORIGINAL_COLUMNS = ["path", "patient_id", "accession", "study_uid", "series_uid", "sop_uid"]


def keyed_instance(key: bytes, row: dict, retain_uids: bool = False) -> str:
    """The pseudonymous file stem anonymize gave the input of ingest ``row``: the keyed SOP Instance
    UID of a DICOM file (its own UID under Retain UIDs or when it is a standard one, as
    :mod:`haven.deid.header` keeps them), the keyed hash of an image's path."""
    kind = (row.get("kind") or "").strip().lower()
    if kind == "dicom":
        sop = (row.get("sop_uid") or "").strip()
        if not sop:
            return ""
        return sop if retain_uids or sop.startswith(STANDARD_UID_ROOT) else keys.uid(key, sop)
    if kind == "nifti":  # a volume's keyed BIDS name (haven.deid.volumes), without its extension
        from haven.deid.volumes import output_name

        return bids.stem(PurePosixPath(output_name(row, key)[0]).name)
    return keys.image_stem(key, row.get("path", ""))


def _index(ingest_manifest: Path, key: bytes, retain_uids: bool) -> tuple[dict, set]:
    """(patient pseudonym, file stem) → ingest row, and the keys two rows share (ambiguous)."""
    index: dict[tuple[str, str], dict] = {}
    ambiguous: set[tuple[str, str]] = set()
    for row in read_rows(ingest_manifest):
        k = (keys.pseudonym(key, row.get("patient_id", "")), keyed_instance(key, row, retain_uids))
        if not k[1]:
            continue
        if k in index:
            ambiguous.add(k)
        index[k] = row
    return index, ambiguous


def _stem(prediction: dict) -> str:
    # predict's `instance` is the DICOM file's stem; an image's or a volume's row has none: its file
    # name without its extension (.nii.gz as one)
    return prediction.get("instance") or bids.stem(PurePosixPath(prediction.get("file", "")).name)


def join(predictions: Path, ingest_manifest: Path, key: bytes, *, retain_uids: bool = False):
    """(rows, columns, counts): each prediction with its original ids, the unmatched counted."""
    predictions, ingest_manifest = Path(predictions), Path(ingest_manifest)
    for path, fix in ((predictions, "run the predict stage first"), (ingest_manifest, "run `haven ingest` first")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {fix}")
    index, ambiguous = _index(ingest_manifest, key, retain_uids)
    rows, counts = [], {"predictions": 0, "matched": 0, "unmatched": 0, "ambiguous": 0}
    columns: list[str] = []
    for p in read_rows(predictions):
        columns = columns or list(p)
        counts["predictions"] += 1
        k = (p.get("patient", ""), _stem(p))
        if k in ambiguous:
            counts["ambiguous"] += 1
        elif k not in index:
            counts["unmatched"] += 1
        else:
            counts["matched"] += 1
            original = index[k]
            rows.append({**p, **{c: original.get(c, "") for c in ORIGINAL_COLUMNS}})
    if not columns:  # no prediction: the table's header only
        with open(predictions, newline="", **TEXT) as fh:
            columns = next(csv.reader(fh), [])
    counts["ingested_not_predicted"] = len(index) - counts["matched"]
    return rows, ORIGINAL_COLUMNS + [c for c in columns if c not in ORIGINAL_COLUMNS], counts


def reidentify(predictions: Path, ingest_manifest: Path, out: Path, settings: dict) -> dict:
    """Write ``out`` (PHI zone, mode 0600): the predictions with their originals.  ``settings``: the
    ``reidentify`` stage's (:func:`haven.config.stage_settings`: key location, ``anonymize``).
    Returns the counts (no identifier)."""
    key = keys.stage_key(settings.get("key_file"), settings.get("key_env"), bool(settings.get("demo_key")))
    retain = bool(settings.get("anonymize", {}).get("retain_uids", False))
    rows, columns, counts = join(predictions, ingest_manifest, key, retain_uids=retain)
    out = Path(out)
    write_rows(out, columns, rows)
    os.chmod(out, 0o600)  # only the owner reads original identifiers
    log.info("reidentify: %(matched)d of %(predictions)d predictions joined to their originals, "
             "%(unmatched)d unmatched, %(ambiguous)d ambiguous", counts)
    return counts
