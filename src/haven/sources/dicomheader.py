"""DICOM header values straight from pydicom's raw elements: text, numbers, the patient's age,
and every identifying value (for the audit), without building pydicom's value objects.

Raw values are decoded here directly when the character set is a single-byte Latin one or UTF-8
(what nearly every file declares): the same strings pydicom would give; any other case goes
through pydicom.  Ingest reads every header of a cohort, so this is its hot path.
:func:`parsed_identifiers` walks the byte-level parse of :mod:`haven.deid.rawread` the same way.
"""

from __future__ import annotations

import datetime as dt
import functools
import re

from haven.deid.profile import FREE_TEXT_KEYWORDS, IDENTIFYING_KEYWORDS

STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
              "UI", "UR", "UT"}
TEXT_VRS = {"LT", "ST", "UT", "UC"}
STANDARD_UID_ROOT = "1.2.840.10008."
MIN_VALUE_CHARS = 3
MAX_VALUE_CHARS = 1024  # a prefix is enough for the audit's substring search
_DECIMAL = re.compile(r"^[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?$")


# ---------------------------------------------------------------------------------------------
# header fields


_FAST_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})


def codec_of(ds) -> str | None:
    """The codec that decodes the file's text values directly; None: its character set needs pydicom."""
    raw = ds._dict.get(0x00080005)
    if raw is None:
        return "latin-1"
    value = raw.value
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    elif not isinstance(value, str):
        value = "\\".join(str(v) for v in value)
    return _FAST_CODECS.get(value.strip().strip("\x00").strip())


def _raw_strings(ds, tag: int, vr: str, codec: str | None) -> list[str] | None:
    """The element's values as strings straight from the raw bytes; None: ask pydicom."""
    raw = ds._dict.get(tag)
    if raw is None:
        return []
    value = getattr(raw, "value", None)
    if codec is None or not getattr(raw, "is_raw", False) or not isinstance(value, (bytes, bytearray)):
        return None
    if vr not in STRING_VRS:
        return None
    try:
        text = bytes(value).decode(codec)
    except UnicodeDecodeError:
        return None
    text = text.rstrip("\x00 ")
    if not text:
        return []
    return [text] if vr in _SINGLE_VALUED else text.split("\\")


@functools.lru_cache(maxsize=256)
def _tag_vr(kw: str) -> tuple[int, str]:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(kw)
    return tag, dictionary_VR(tag)


def text(ds, kw: str, codec: str | None = "latin-1") -> str:
    """The element named ``kw`` as one stripped string (values joined by a backslash); "" when absent."""
    tag, dict_vr = _tag_vr(kw)
    raw = ds._dict.get(tag)
    if raw is None:
        return ""
    vr = raw.VR if raw.VR not in (None, "UN") else dict_vr
    fast = _raw_strings(ds, tag, vr, codec)
    if fast is not None:
        return "\\".join(v.strip() for v in fast).strip()
    v = ds.get(kw, "")
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        v = "\\".join(str(x) for x in v)
    return str(v).strip()


def uint(ds, kw: str) -> int | None:
    """A US/UL value (Rows, Columns, BitsAllocated, ...) from its raw bytes; None when absent."""
    raw = ds._dict.get(_tag_vr(kw)[0])
    if raw is None:
        return None
    value = getattr(raw, "value", None)
    if getattr(raw, "is_raw", False) and isinstance(value, (bytes, bytearray)) and len(value) in (2, 4):
        little = ds.is_little_endian if ds.is_little_endian is not None else True
        return int.from_bytes(value, "little" if little else "big")
    v = ds.get(kw)
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)


def age_years(ds, codec: str | None = "latin-1") -> str:
    """PatientAge in years, else the age at the first study (series, ...) date after PatientBirthDate;
    "" when neither is known."""
    m = _AGE.match(text(ds, "PatientAge", codec))
    if m:
        n, unit = int(m.group(1)), (m.group(2) or "Y").upper()
        years = {"Y": n, "M": n / 12, "W": n * 7 / 365.25, "D": n / 365.25}[unit]
        return _fmt_num(years)
    birth = _date(text(ds, "PatientBirthDate", codec))
    if birth is None:
        return ""
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        when = _date(text(ds, kw, codec))
        if when is not None and when >= birth:
            years = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
            return _fmt_num(years)
    return ""


def _date(s: str) -> dt.date | None:
    s = s.strip().replace(".", "").replace("-", "")
    if len(s) < 8 or not s[:8].isdigit():
        return None
    try:
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return None


def _fmt_num(x: float) -> str:
    x = round(float(x), 2)
    return str(int(x)) if x == int(x) else f"{x:g}"


# ---------------------------------------------------------------------------------------------
# identifiers


def _tag_name(elem) -> str:
    if elem.tag.is_private or not elem.keyword:
        return f"({elem.tag.group:04X},{elem.tag.element:04X})"
    return elem.keyword


def _strings(elem) -> list[str]:
    """The element's value(s) as strings (bytes of UN elements only when they are printable text)."""
    v = elem.value
    if v is None:
        return []
    if isinstance(v, (bytes, bytearray)):
        if elem.VR != "UN" or len(v) > 4096:
            return []
        try:
            text = bytes(v).rstrip(b"\x00 ").decode("utf-8")
        except UnicodeDecodeError:
            try:
                text = bytes(v).rstrip(b"\x00 ").decode("latin-1")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
                return []
        if not text or not all(c.isprintable() or c in "\r\n\t" for c in text):
            return []
        return [p for p in text.split("\\")]
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [str(x) for x in v if x is not None]
    return [str(v)]


def _identifying(elem) -> bool:
    vr = elem.VR
    tag = elem.tag
    if tag.is_private:
        return not tag.is_private_creator and (vr in STRING_VRS - {"DS", "IS"} or vr == "UN")
    kw = elem.keyword
    if vr in ("PN", "DA", "DT") or vr in TEXT_VRS:
        return True
    if vr == "UI":
        return True  # filtered by value below (standard UIDs are not identifying)
    return kw in IDENTIFYING_KEYWORDS or kw in FREE_TEXT_KEYWORDS


@functools.lru_cache(maxsize=65536)
def _may_identify(t: int, vr: str | None) -> bool:
    """Whether the element (tag, VR as read) can hold an identifying value (sequences: yes, to
    walk them) -- decided from the tag and VR alone, so that other elements are never decoded."""
    from pydicom.datadict import DicomDictionary

    group, number = t >> 16, t & 0xFFFF
    if group & 1:  # private: everything textual but the creator
        return not (0x0010 <= number <= 0x00FF) and (vr in (None, "UN", "SQ") or vr in STRING_VRS - {"DS", "IS"})
    entry = DicomDictionary.get(t)
    if vr in (None, "UN") and entry:
        vr = entry[0]
    if vr in ("SQ", "UN", None):
        return True
    keyword = entry[4] if entry else ""
    return (vr in ("PN", "DA", "DT", "UI") or vr in TEXT_VRS or keyword in IDENTIFYING_KEYWORDS
            or keyword in FREE_TEXT_KEYWORDS)


def identifiers(ds, prefix: str = "", codec: str | None = "latin-1"):
    """Yield (tag path, value) for every identifying value, recursively through sequences."""
    from pydicom.datadict import DicomDictionary

    for tag, raw in list(ds._dict.items()):
        if tag.group == 0x0002 or tag.group == 0x7FE0:
            continue
        try:
            t = int(tag)
            if not _may_identify(t, raw.VR):
                continue  # left undecoded
            entry = DicomDictionary.get(t) if not tag.group & 1 else None
            vr = raw.VR if raw.VR not in (None, "UN") or entry is None else entry[0]
            fast = None
            private = bool(tag.group & 1)
            # private elements too, by the VR the file gives (an explicit string VR: the values
            # pydicom's conversion gives; UN and implicit VR take pydicom's path below)
            if vr != "SQ" and (entry is not None or private):
                fast = _raw_strings(ds, t, vr, codec)
            if fast is not None:
                name = prefix + (f"({t >> 16:04X},{t & 0xFFFF:04X})" if private else entry[4])
                values, is_uid = fast, vr == "UI"
            else:
                elem = ds[tag]  # converting a raw element may fail on a malformed value
                name = prefix + _tag_name(elem)
                if elem.VR == "SQ":
                    for i, item in enumerate(elem.value or []):
                        yield from identifiers(item, f"{name}[{i}].", codec)
                    continue
                if not _identifying(elem):
                    continue
                values, is_uid, private = _strings(elem), elem.VR == "UI", elem.tag.is_private
            yield from _kept(name, values, is_uid, private)
        except Exception:  # an unparsable element: skip it, keep walking
            continue


def _kept(name: str, values: list[str], is_uid: bool, private: bool):
    """(name, value) of the values worth searching for."""
    for value in values:
        value = value.strip().strip("\x00").strip()
        if len(value) < MIN_VALUE_CHARS:
            continue
        if is_uid and value.startswith(STANDARD_UID_ROOT):
            continue
        if private and _DECIMAL.match(value):
            continue  # vendor measurements (1.016600): numbers, not identifiers
        yield name, value[:MAX_VALUE_CHARS]


def parsed_identifiers(elements: list, codec: str, prefix: str = ""):
    """:func:`identifiers` over the elements of :func:`haven.deid.rawread.parse`: the same (tag
    path, value) pairs in the same order, decoded as :func:`identifiers` decodes raw elements;
    :class:`~haven.deid.rawread.Unusual` where it would convert an element through pydicom (but
    for private UN elements, whose conversion is done here as pydicom does it)."""
    from pydicom.datadict import DicomDictionary

    from haven.deid.rawread import Unusual, keyword, private_vr

    for tag, vr, _, value, _ in elements:
        group = tag >> 16
        if group == 0x0002 or group == 0x7FE0 or not _may_identify(tag, vr):
            continue
        private = bool(group & 1)
        entry = None if private else DicomDictionary.get(tag)
        vr = vr if vr not in (None, "UN") or entry is None else entry[0]
        if isinstance(value, list):  # a sequence
            kw = "" if private else keyword(tag)
            name = prefix + (kw or f"({group:04X},{tag & 0xFFFF:04X})")
            for i, item in enumerate(value):
                yield from parsed_identifiers(item, codec, f"{name}[{i}].")
            continue
        if vr == "SQ":
            raise Unusual("a sequence pydicom would convert from another VR")
        name = prefix + (f"({group:04X},{tag & 0xFFFF:04X})" if private else entry[4] if entry else "")
        if value is None:
            continue  # pydicom's empty value: no strings
        if (entry is not None or private) and vr in STRING_VRS:
            try:
                text = value.decode(codec).rstrip("\x00 ")
            except UnicodeDecodeError:
                raise Unusual("a value not in the character set") from None
            values = [] if not text else [text] if vr in _SINGLE_VALUED else text.split("\\")
            yield from _kept(name, values, vr == "UI", private)
        elif private and vr == "UN" and private_vr(elements, tag, codec) == "UN":
            yield from _kept(name, _un_strings(value), False, True)
        else:
            raise Unusual("an element pydicom would convert")


def _un_strings(v: bytes) -> list[str]:
    """:func:`_strings` of a UN value."""
    if len(v) > 4096:
        return []
    try:
        text = v.rstrip(b"\x00 ").decode("utf-8")
    except UnicodeDecodeError:
        text = v.rstrip(b"\x00 ").decode("latin-1")
    if not text or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return []
    return text.split("\\")
