"""The PS3.15 Annex E action table, with haven's options applied (tag -> action).

The table itself is generated data (``data/ps315_basic_profile.csv``, ``tag,keyword,action``:
every attribute of Table E.1-1 of DICOM 2026c plus those earlier editions listed, made by
:mod:`haven.deid.ps315`).  Actions: ``X`` remove, ``Z`` empty, ``D`` dummy, ``U`` keyed UID,
``K`` keep, ``C`` clean (dates shifted); the options add ``T`` (device identity: keyed token),
``S`` (Clean Descriptors: scrubbed text) and ``P`` (the patient pseudonym).
"""

from __future__ import annotations

import csv
import re
from functools import lru_cache
from pathlib import Path

from pydicom.datadict import DicomDictionary

from haven.deid.profile import BIRTH_DATES, CLEAN_DESCRIPTORS, DEVICE_IDENTITY, PATIENT_CHARACTERISTICS

PROFILE_PATH = Path(__file__).resolve().parent / "data" / "ps315_basic_profile.csv"

# D on a sequence means "replace by a dummy item"; haven removes such sequences (PS3.15 E.1.1
# note 13) except the structural ones below, which are kept and cleaned recursively.
STRUCTURAL_SEQUENCES = ("ContentSequence", "GraphicAnnotationSequence")
TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
_DESCRIPTIVE = re.compile(r"Comment|Description|Notes|Narrative|Address|Telephone|Telecom")


def load_profile(path: Path = PROFILE_PATH) -> dict[str, str]:
    """The table as ``{"(gggg,eeee)": action}`` (repeating groups keep their ``xx``)."""
    rows: dict[str, str] = {}
    with open(path, newline="") as fh:
        lines = (line for line in fh if line.strip() and not line.startswith("#"))
        for row in csv.DictReader(lines):
            action = row["action"].strip().upper()
            if action not in {"X", "Z", "D", "U", "K", "C"}:
                raise ValueError(f"{path}: unknown action {action!r} for {row['tag']}")
            rows[row["tag"].strip().lower()] = action
    return rows


def _tag_int(text: str) -> int | None:
    m = re.fullmatch(r"\(([0-9a-f]{4}),([0-9a-f]{4})\)", text)
    return int(m.group(1) + m.group(2), 16) if m else None


@lru_cache(maxsize=32)
def action_table(dates: bool, patient: bool, device: bool, descriptors: bool = False) -> dict[int, str]:
    """Tag -> action for one option set, with the options applied (computed once)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    def tag(kw: str) -> int:
        t = tag_for_keyword(kw)
        assert t is not None, kw
        return t

    actions: dict[int, str] = {}
    # descriptive free text outside the table (defence in depth)
    for t, entry in DicomDictionary.items():
        if entry[0] in TEXT_VRS and _DESCRIPTIVE.search(entry[4]):
            actions[t] = "X"
    for text, action in load_profile().items():
        t = _tag_int(text)
        if t is not None:  # repeating groups (50xx curves, 60xx overlays) are removed by group
            actions[t] = action
    if dates:
        birth = {tag(k) for k in BIRTH_DATES}
        for t in list(actions):
            try:
                vr = dictionary_VR(t)
            except KeyError:
                continue
            if vr in ("DA", "DT", "TM") and t not in birth:
                actions[t] = "C"
    if patient:
        for kw in PATIENT_CHARACTERISTICS:
            actions[tag(kw)] = "K"
    if device:
        for kw in DEVICE_IDENTITY:
            t = tag(kw)
            vr = dictionary_VR(t)
            actions[t] = "U" if vr == "UI" else "X" if vr == "SQ" else "T"
    if descriptors:
        for kw in CLEAN_DESCRIPTORS:
            actions[tag(kw)] = "S"
    for kw in ("PatientID", "PatientName"):
        actions[tag(kw)] = "P"
    for kw in ("SOPClassUID", "ReferencedSOPClassUID"):
        actions.pop(tag(kw), None)  # remapped only when not a standard UID (the UI default)
    # sequences the table marks D: removed, except the structural ones (kept, cleaned inside)
    structural = {tag(k) for k in STRUCTURAL_SEQUENCES}
    for t, action in list(actions.items()):
        if action == "D" and t not in structural:
            try:
                if dictionary_VR(t) == "SQ":
                    actions[t] = "X"
            except KeyError:
                pass
    for t in structural:
        actions[t] = "K"
    return actions


def option_actions(opts: dict) -> dict[int, str]:
    """The action table of one (complete) option set."""
    return action_table(bool(opts["retain_longitudinal_modified_dates"]),
                        bool(opts["retain_patient_characteristics"]),
                        bool(opts["retain_device_identity"]),
                        bool(opts["clean_descriptors"]))


def profile_size() -> int:
    """Number of attributes in the Annex E table file (repeating groups counted once)."""
    return len(load_profile())
