"""The DICOM header de-identifier: one pass over a data set's elements, recursively.

PS3.15 Annex E *Basic Application Level Confidentiality Profile*: each element gets the action of
the table (:mod:`haven.deid.table`), with defence in depth beyond it, applied through every sequence:
every private element, group length, command/file-meta element in the data set, overlay (60xx)
and curve (50xx) group is removed; every UI value outside the DICOM root ``1.2.840.10008.`` is
remapped with the keyed UID (so references between files stay consistent); every PN is emptied
(``PatientName`` becomes the patient pseudonym); every DA/DT is shifted by the per-patient
:func:`haven.keys.day_shift`; every free-text element (LT/ST/UT/UC/UR), AE title, UN element and
descriptive text (``*Comment*``, ``*Description*``, ``*Notes*``, addresses, phone numbers) outside
the table is removed.  Elements the profile leaves alone stay raw (their bytes never decoded).

Options: *Retain Longitudinal Temporal Information with Modified Dates* (DA/DT shifted, TM kept),
*Retain Patient Characteristics* (sex, age, size, weight, ... kept; the birth date is emptied),
*Retain Device Identity* (manufacturer and model are always kept; serial numbers, station names and
other device identifiers of the table become keyed tokens ``D...`` so that the same device keeps one
identity without its real value), *Clean Descriptors* (:func:`scrub`), *Retain UIDs* and *Retain
Safe Private*.
"""

from __future__ import annotations

import datetime as dt
import re

from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag

from haven import keys
from haven.deid import dicomraw
from haven.deid.profile import IDENTIFYING_KEYWORDS, STANDARD_SCHEMES
from haven.deid.table import TEXT_VRS

STANDARD_UID_ROOT = "1.2.840.10008."
DUMMY_TEXT = "ANONYMIZED"
# Free-text and network VRs removed wherever the table says nothing.
REMOVE_VRS = frozenset({"LT", "ST", "UT", "UC", "UR", "UN", "AE"})
# string VRs an ASCII value can be written to as raw bytes (space-padded, UI NUL-padded)
RAW_TEXT_VRS = dicomraw.ASCII_VRS | {"LO", "SH", "LT", "ST", "UT", "UC", "PN", "UR"}


class Context:
    """Everything one DICOM file needs: key, patient pseudonym, date shift, counters."""

    __slots__ = ("key", "pseudonym", "shift", "actions", "changed", "uid_cache", "retain_uids", "phi", "safe")

    def __init__(self, key: bytes, pseudonym: str, shift: int, actions: dict[int, str],
                 uid_cache: dict[str, str], retain_uids: bool = False, phi: re.Pattern | None = None,
                 safe: dict[tuple[int, str], frozenset[int]] | None = None):
        self.safe = safe or {}
        self.retain_uids = retain_uids
        self.phi = phi
        self.key = key
        self.pseudonym = pseudonym
        self.shift = shift
        self.actions = actions
        self.changed = 0
        self.uid_cache = uid_cache

    def uid(self, value: str) -> str:
        new = self.uid_cache.get(value)
        if new is None:
            new = self.uid_cache[value] = keys.uid(self.key, value)
        return new


def shift_date(value: str, days: int) -> str:
    """``YYYYMMDD`` (or ACR-NEMA ``YYYY.MM.DD``) shifted by ``days``; "" when not a date."""
    s = value.strip()
    if len(s) == 10 and s[4] == "." and s[7] == ".":
        s = s[:4] + s[5:7] + s[8:]
    if len(s) != 8 or not s.isdigit():
        return ""
    try:
        d = dt.date(int(s[:4]), int(s[4:6]), int(s[6:8])) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def shift_datetime(value: str, days: int) -> str:
    s = value.strip()
    if len(s) < 8:
        return ""  # a year or year+month only cannot be shifted exactly: drop it
    head = shift_date(s[:8], days)
    return head + s[8:] if head else ""


_LONG_NUMBER = re.compile(r"(?<![0-9])[0-9]{5,}(?![0-9])")
_DATE_LIKE = re.compile(r"(?<![0-9])([0-9]{1,4}[/.\-][0-9]{1,2}[/.\-][0-9]{1,4})(?![0-9])")


def phi_pattern(ds) -> re.Pattern | None:
    """One regex for every identifying value of a data set (recursively): person-name parts, ids,
    institution and station names, and each date in the spellings people type."""

    terms: set[str] = set()

    def walk(d) -> None:
        for elem in d:
            vr = elem.VR
            if vr == "SQ":
                for item in elem.value or []:
                    walk(item)
                continue
            if vr not in ("PN", "DA", "DT", "LO", "SH", "CS", "ST") or elem.tag.is_private:
                continue
            if vr not in ("PN", "DA", "DT") and elem.keyword not in IDENTIFYING_KEYWORDS:
                continue
            for v in _values(elem.value):
                v = str(v).strip()
                if not v:
                    continue
                if vr == "PN":
                    terms.update(p for p in re.split(r"[\^= ,]+", v) if len(p) >= 2)
                elif vr in ("DA", "DT"):
                    y, m, dd = v[:4], v[4:6], v[6:8]
                    if len(v) >= 8 and v[:8].isdigit():
                        for a, b in ((m, dd), (dd, m)):
                            terms.update({f"{y}{a}{b}", f"{y}-{a}-{b}", f"{y}.{a}.{b}", f"{y}/{a}/{b}",
                                          f"{a}/{b}/{y}", f"{a}.{b}.{y}", f"{a}-{b}-{y}",
                                          f"{int(a)}/{int(b)}/{y}", f"{a}/{b}/{y[2:]}"})
                else:
                    terms.add(v)
                    terms.update(w for w in v.split() if len(w) >= 4)
    walk(ds)
    terms = {t for t in terms if len(t) >= 2}
    if not terms:
        return None
    alternation = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(rf"(?<![0-9A-Za-z])(?:{alternation})(?![0-9A-Za-z])", re.IGNORECASE)


def scrub(text: str, phi: re.Pattern | None) -> str:
    """``text`` without the identifying values of ``phi``, long numbers and dates."""
    if phi is not None:
        text = phi.sub(" ", text)
    text = _DATE_LIKE.sub(" ", _LONG_NUMBER.sub(" ", text))
    text = re.sub(r"\(\s*\)|\[\s*\]", " ", re.sub(r"[\^=]+", " ", text))  # name separators, emptied brackets
    text = re.sub(r"\s+", " ", text).strip(" ,;:-/")
    return text if any(c.isalnum() for c in text) else ""


def _values(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _set(ds, t: int, vr: str, value) -> None:
    ds[t] = DataElement(t, vr, value)


def put(ds, t: int, vr: str, values: list[str]) -> None:
    """Set element ``t`` to ``values``: as a raw element (written as bytes, never decoded) when
    the data set was read little endian and the values are ASCII, else as a DataElement."""
    implicit, little = ds.original_encoding
    if little and implicit is not None and vr in RAW_TEXT_VRS:
        new = dicomraw.text_element(t, vr, values, implicit)
        if new is not None:
            ds._dict[t if type(t) is BaseTag else BaseTag(t)] = new
            return
    _set(ds, t, vr, values if len(values) > 1 else (values[0] if values else ""))


def _drop(ds, t) -> None:
    del ds._dict[t]


def _dummy(vr: str, ctx: Context):
    if vr in ("LO", "SH", "CS", "LT", "ST", "UT", "UC", "AE"):
        return DUMMY_TEXT
    if vr == "PN":
        return ""
    if vr == "DA":
        return "19000101"
    if vr == "DT":
        return "19000101000000"
    if vr == "TM":
        return "000000"
    if vr in ("IS", "DS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"):
        return 0
    if vr == "AS":
        return "000Y"
    return None


def clean(ds, ctx: Context) -> None:
    """De-identify one (nested) data set in place: one pass over its elements, which stay raw
    (undecoded bytes) unless the profile changes them."""
    actions = ctx.actions
    keep = _safe_private(ds, ctx.safe) if ctx.safe else frozenset()
    elements = ds._dict
    for tag in list(elements):
        t = int(tag)
        group = t >> 16
        if group & 1 and t in keep:
            continue  # Retain Safe Private: an allow-listed element of its private creator, as read
        if group & 1 or group <= 0x0002 or (t & 0xFFFF) == 0 or (group & 0xFF00) in (0x5000, 0x6000):
            # private, command/meta elements, group lengths, curves and overlays
            del elements[tag]
            ctx.changed += 1
            continue
        action = actions.get(t)
        if action == "X":
            del elements[tag]
            ctx.changed += 1
            continue
        vr = dicomraw.vr_of(ds, tag)
        if action is None:
            if vr == "SQ":
                action = "K"
            elif vr == "UI":
                action = "U"
            elif vr in ("DA", "DT"):
                action = "C"
            elif vr == "PN":
                action = "Z"
            elif vr in REMOVE_VRS:
                del elements[tag]
                ctx.changed += 1
                continue
            else:
                continue  # keep untouched (the raw value is not even decoded)
        if vr == "SQ":
            _apply_sequence(ds, tag, action, ctx)
        elif action != "K":
            _apply(ds, tag, vr, action, ctx)
    if ds._private_blocks:
        ds._private_blocks = {}  # the private creators are gone
    if 0x00080104 in elements and 0x00080102 in elements:
        _clean_local_code(ds, ctx)


def _safe_private(ds, safe: dict[tuple[int, str], frozenset[int]]) -> frozenset[int]:
    """Tags of ``ds`` kept under Retain Safe Private: the allow-listed elements of each private
    block, and the creator elements of the blocks that keep any."""
    keep: set[int] = set()
    groups = {g for g, _ in safe}
    for tag in ds.keys():
        t = int(tag)
        group, element = t >> 16, t & 0xFFFF
        if group not in groups or not 0x0010 <= element <= 0x00FF:
            continue
        try:
            creator = str(ds[t].value or "").strip()
        except Exception:
            continue
        offsets = safe.get((group, creator))
        if not offsets:
            continue
        block = element << 8
        found = {(group << 16) | block | o for o in offsets if ((group << 16) | block | o) in ds}
        if found:
            keep |= found | {t}
    return frozenset(keep)


def _clean_local_code(item, ctx: Context) -> None:
    """A code item of a local coding scheme (``SIEMENS_RIS``, ``99HOSP``...): its meaning is the
    institution's own free text (often the study description), so it becomes the code value."""
    scheme = str(item.get("CodingSchemeDesignator", "") or "").strip()
    if scheme in STANDARD_SCHEMES:
        return
    value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
    meaning = str(item.get("CodeMeaning", "") or "")
    if meaning and meaning != value:
        item.CodeMeaning = value or DUMMY_TEXT
        ctx.changed += 1


def _apply_sequence(ds, t: int, action: str, ctx: Context) -> None:
    if action in ("K", "U", "C", "D"):
        for item in ds[t].value or []:
            clean(item, ctx)
    elif action == "Z":
        if ds[t].value:
            _set(ds, t, "SQ", [])
            ctx.changed += 1
    else:  # T, P or anything unexpected on a sequence: remove it
        _drop(ds, t)
        ctx.changed += 1


def _apply(ds, t: int, vr: str, action: str, ctx: Context) -> None:
    """One element's action (not K, not a sequence: :func:`clean` handles those inline)."""
    if " or " in vr:  # an ambiguous VR (US or SS, OB or OW) cannot get a dummy: remove it
        _drop(ds, t)
        ctx.changed += 1
        return
    if action == "P":  # PatientID / PatientName: the keyed patient pseudonym
        put(ds, t, "PN" if t == 0x00100010 else "LO", [ctx.pseudonym])
        ctx.changed += 1
        return
    if action == "Z" or (vr == "PN" and action in ("D", "C", "T", "U")):
        if vr == "PN" or vr in TEXT_VRS or vr in ("CS", "DA", "DT", "TM", "AS", "UI", "IS", "DS", "AE"):
            put(ds, t, vr, [])
        else:
            _set(ds, t, vr, None)
        ctx.changed += 1
        return
    if action == "S":  # Clean Descriptors: the text without this file's identifying values
        old = dicomraw.values(ds, t, vr)
        new = [scrub(v, ctx.phi) for v in old]
        if new != old:
            _set(ds, t, vr, new if len(new) > 1 else (new[0] if new else ""))
            ctx.changed += 1
        return
    if vr == "UI" and ctx.retain_uids:
        return  # Retain UIDs option
    if vr == "UI" and action in ("U", "D", "C", "T"):
        old = dicomraw.values(ds, t, vr)
        # a standard UID (SOP classes, coding schemes, ...) is kept everywhere, so that
        # references stay consistent; every other UID maps to its keyed 2.25 UID
        new = [v if v.startswith(STANDARD_UID_ROOT) else ctx.uid(v) for v in old if v]
        if new != old:
            put(ds, t, "UI", new)
            ctx.changed += 1
        return
    if action == "C":
        if vr == "DA":
            old = dicomraw.values(ds, t, vr)
            new = [v for v in (shift_date(v, ctx.shift) for v in old) if v]
        elif vr == "DT":
            old = dicomraw.values(ds, t, vr)
            new = [v for v in (shift_datetime(v, ctx.shift) for v in old) if v]
        elif vr == "TM":
            return  # times of day carry no date: kept under the modified-dates option
        else:
            action = "D"
            old = new = None
        if action == "C":
            if new != old:
                put(ds, t, vr, new)
                ctx.changed += 1
            return
    if action == "T":  # device identity: one keyed token per value
        old = dicomraw.values(ds, t, vr)
        if vr in ("LO", "SH", "CS", "AE", "LT", "ST", "UT", "UC"):
            new = [keys.pseudonym(ctx.key, v, prefix="D", length=10) for v in old]
            put(ds, t, vr, new)
        else:
            _drop(ds, t)
        ctx.changed += 1
        return
    # D (and U on a non-UI element): a dummy of the right VR, removal when there is none
    value = _dummy(vr, ctx)
    if value is None:
        _drop(ds, t)
    elif isinstance(value, str):
        put(ds, t, vr, [value])
    else:
        _set(ds, t, vr, value)
    ctx.changed += 1

