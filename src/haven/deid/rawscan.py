"""The audit's walk of a DICOM file on its byte-level parse (:mod:`haven.deid.rawread`).

:func:`walk` yields what :func:`haven.deid.scan._walk_dicom` yields for the File Meta Information
and the data set that pydicom reads from the same file - (where, VR, text, public element), in
the same order, each text the values pydicom's conversion gives joined by backslashes - without
building pydicom's elements.  Text values are decoded here as pydicom decodes them (the single-byte
Latin character sets and UTF-8); numbers, tags, decimal and integer strings and whatever else go
through pydicom's own conversion of that one element (memoised: such values repeat from file to
file).  Empty texts, which match nothing, are left out.  What needs the whole pydicom data set (an
ambiguous VR, a character set decoded otherwise, an item with its own character set, implicit-VR
private elements...) raises :class:`~haven.deid.rawread.Unusual`: the audit then reads the file
with pydicom.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from haven.deid.identifiers import MAX_BINARY, name_of, strings
from haven.deid.profile import STANDARD_SCHEMES
from haven.deid.rawread import FAST_CODECS, Parsed, Unusual, dictionary_vr, keyword, private_vr

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
UNSEARCHED_ELEMENTS = frozenset({"Manufacturer", "ManufacturerModelName"})
CODE_ELEMENTS = frozenset({"CodeValue", "CodeMeaning", "CodingSchemeDesignator", "CodingSchemeVersion",
                           "LongCodeValue", "URNCodeValue"})
_LATIN = "latin-1"
_MULTI_STRING = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})  # pydicom's multi_string of ISO 8859
_TEXT = frozenset({"SH", "LO", "UC"})  # convert_text: split, each value stripped of trailing NUL/space
_SINGLE = frozenset({"LT", "ST", "UT"})
_BYTES = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_NEVER_FAIL = _BYTES | _TEXT | _SINGLE  # VRs whose conversion never raises (bytes kept, text decoded with replacement)
_MEMO_MAX = 200_000
_memo: dict = {}


class _Failed:
    """pydicom's conversion of the value raised: the walk yields the raw bytes instead."""


FAILED = _Failed()


def walk(parsed: Parsed) -> Iterator[tuple[str, str | None, str, bool]]:
    """:func:`haven.deid.scan._walk_dicom` of the file's meta group, then of its data set."""
    charset = next((e for e in parsed.body if e[0] == 0x00080005), None)
    value = charset[3] if charset is not None else None
    name = (value or b"").decode(_LATIN).rstrip(" \x00").strip()
    if charset is not None and value is not None and (b"\\" in value or charset[1] not in ("CS", None)):
        raise Unusual("character set")
    codec = FAST_CODECS.get(name)
    if codec is None:
        raise Unusual("character set")
    from pydicom.charset import convert_encodings

    yield from _level(parsed.meta, "", _LATIN, ("iso8859",), False)
    yield from _level(parsed.body, "", codec, tuple(convert_encodings(name or None)), parsed.implicit)


def _level(elements: list, prefix: str, codec: str, encodings: tuple, implicit: bool):
    standard_code = _standard_code(elements, codec)
    for tag, vr, length, value, _ in elements:
        if vr is None or vr == "UN":
            vr = _resolved_vr(elements, tag, vr, value, codec)
        if value is None:
            continue  # pydicom's empty value: no strings
        if isinstance(value, list):
            if vr != "SQ":
                raise Unusual("items under another VR")
            where = prefix + name_of_tag(tag)
            for i, item in enumerate(value):
                yield from _level(item, f"{where}[{i}].", codec, encodings, implicit)
            continue
        if vr == "SQ":
            raise Unusual("a sequence pydicom would convert from another VR")
        skip, where = _plan(tag, standard_code)
        if skip and vr in _NEVER_FAIL:
            continue  # not searched, and its conversion cannot fail: not even decoded
        values = _values(tag, vr, length, value, codec, encodings, implicit)
        if values is FAILED:  # as _walk_dicom: the raw bytes, named by the tag
            if isinstance(value, bytes) and len(value) <= MAX_BINARY and value:
                yield prefix + name_of(_Tag(tag), ""), "UN", value.decode(_LATIN), False
            continue
        if skip:
            continue
        text = "\\".join(values)
        if text:
            yield prefix + where, vr, text, not tag >> 16 & 1


@functools.lru_cache(maxsize=16384)
def _plan(tag: int, standard_code: bool) -> tuple[bool, str]:
    """(whether _walk_dicom leaves the element out: pixel data, device type, a standard code's
    value or meaning; the element's name in a place)."""
    kw = keyword(tag)
    skip = tag in PIXEL_TAGS or kw in UNSEARCHED_ELEMENTS or (standard_code and kw in CODE_ELEMENTS)
    return skip, (kw if kw and not tag >> 16 & 1 else name_of_tag(tag))


class _Tag(int):
    """A tag as :func:`haven.deid.identifiers.name_of` reads it."""

    @property
    def group(self) -> int:
        return self >> 16

    @property
    def element(self) -> int:
        return self & 0xFFFF


@functools.lru_cache(maxsize=8192)
def name_of_tag(tag: int) -> str:
    return name_of(_Tag(tag), "" if tag >> 16 & 1 else keyword(tag))


def _standard_code(elements: list, codec: str) -> bool:
    """Whether the level's CodingSchemeDesignator names a standard scheme (as _walk_dicom reads it)."""
    found = next((e for e in elements if e[0] == 0x00080102), None)
    if found is None or not isinstance(found[3], bytes):
        return False
    if b"\\" in found[3] or b"\x1b" in found[3] or found[1] not in ("SH", None):
        return False if b"\\" in found[3] else _raise("coding scheme")
    try:
        return found[3].decode(codec).rstrip("\x00 ").strip() in STANDARD_SCHEMES
    except UnicodeDecodeError:
        raise Unusual("coding scheme") from None


def _raise(why: str):
    raise Unusual(why)


def _resolved_vr(elements: list, tag: int, vr: str | None, value, codec: str) -> str:
    """The VR pydicom's conversion gives the element."""
    if vr is None:
        vr = dictionary_vr(tag)
        if vr is None:
            if tag >> 16 & 1:
                raise Unusual("implicit private element")
            vr = "UL" if not tag & 0xFFFF else "UN"
    elif vr == "UN":
        if tag >> 16 & 1:
            vr = private_vr(elements, tag, codec)
        elif value is None or isinstance(value, list) or len(value) < 0xFFFF:
            vr = dictionary_vr(tag) or "UN"
    if " or " in vr:
        raise Unusual("ambiguous VR")
    return vr


def _values(tag: int, vr: str, length: int, value, codec: str, encodings: tuple, implicit: bool):
    """The strings of the element's converted value (:func:`haven.deid.identifiers.strings`), or FAILED."""
    if value is None:
        return []
    if b"\x1b" not in value:
        try:
            if vr in _MULTI_STRING:
                return value.decode(_LATIN).rstrip(" \x00").split("\\")
            if vr in _TEXT:
                return [v.rstrip("\x00 ") for v in value.decode(codec).split("\\")]
            if vr in _SINGLE:
                return [value.decode(codec).rstrip("\x00 ")]
            if vr == "PN":
                return value.rstrip(b"\x00 ").decode(codec).split("\\")
            if vr == "UR":
                return [value.decode(_LATIN).rstrip()]
        except UnicodeDecodeError:
            pass
        if vr in _BYTES:
            return [value.decode(_LATIN)] if len(value) <= MAX_BINARY else []
    if len(value) > 64:
        return _converted(tag, vr, length, value, encodings, implicit)
    key = (vr, value, encodings)
    got = _memo.get(key)
    if got is None:
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        got = _memo[key] = _converted(tag, vr, length, value, encodings, implicit)
    return got


def _converted(tag: int, vr: str, length: int, value: bytes, encodings: tuple, implicit: bool):
    """pydicom's conversion of the one element."""
    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.tag import BaseTag

    raw = RawDataElement(BaseTag(tag), vr, length, value, 0, implicit, True)
    try:
        return strings(convert_raw_data_element(raw, encoding=list(encodings)).value)
    except Exception:
        return FAILED
