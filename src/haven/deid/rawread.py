"""A Part 10 DICOM file parsed at the byte level, for the stages that only look at its values.

Ingest (the manifest fields and the identifiers) and the audit (every value of an output) read
every element of every file; pydicom's reader builds a ``RawDataElement`` per element, a
``Dataset`` per sequence item and converts values through its hooks, which costs more than the
looking.  :func:`parse` walks the bytes once into plain tuples instead:

* :class:`Parsed`: the preamble, the File Meta Information and the data set as lists of
  :data:`Element` ``(tag, VR as in the file or None, length, value)``, where the value of a
  sequence is its items (each a list of elements) and any other value its raw bytes (encapsulated
  pixel data: its items up to the sequence delimiter, as pydicom keeps it).

Only the plain case is parsed, and exactly as pydicom reads it: a file with the preamble and
``DICM``, an explicit-VR File Meta group, a little-endian transfer syntax that is not deflated,
elements in ascending order, lengths that fit.  Anything else - big endian, deflate, an
implicit-VR switch, a VR that is not a known one, a truncated element, an undefined length that is
not a sequence or pixel data, implicit-VR private elements, an item with its own character set -
raises :class:`Unusual`, and the caller reads the file with pydicom as before.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_U16 = struct.Struct("<HH")
_U32 = struct.Struct("<L")
_IMPLICIT = struct.Struct("<HHL")
_HEAD = struct.Struct("<HH2sH")
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_SEQ_END_BYTES = b"\xfe\xff\xdd\xe0"
_PIXEL_DATA = 0x7FE00010
VRS = frozenset({"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF",
                 "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
                 "UR", "US", "UT", "UV"})
_LONG = frozenset(EXPLICIT_VR_LENGTH_32)
_VR_OF = {vr.encode(): vr for vr in VRS}

# the character sets whose values are decoded here (as pydicom decodes them): Python's codec
FAST_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
Element = tuple  # (tag: int, vr: str | None, length: int, value: bytes | None | list[Item], value position)


class Items(list):
    """A sequence's items (each an :class:`Item`); ``stop``: where its delimiter lies (undefined length)."""

    stop = -1


class Item(list):
    """A sequence item: its elements, where its item tag is, and whether its length is undefined."""

    def __init__(self, elements: list, at: int, undefined: bool):
        super().__init__(elements)
        self.at, self.undefined = at, undefined


class Unusual(Exception):
    """The file needs pydicom's reader (see the module docstring)."""


class Parsed(NamedTuple):
    preamble: bytes
    meta: list
    body: list
    transfer_syntax: str
    implicit: bool


@functools.lru_cache(maxsize=4096)
def dictionary_vr(tag: int) -> str | None:
    """The data dictionary's VR of a tag (repeating groups included); None when unknown."""
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def keyword(tag: int) -> str:
    """The keyword pydicom's ``DataElement.keyword`` gives (empty for private and unknown tags)."""
    from pydicom.datadict import dictionary_has_tag, dictionary_keyword

    return dictionary_keyword(tag) if dictionary_has_tag(tag) else ""


@functools.lru_cache(maxsize=256)
def _syntax(uid: str) -> bool:
    """Whether the body of a file in transfer syntax ``uid`` is implicit VR; Unusual when it is not
    little endian, deflated, or not a known transfer syntax."""
    from pydicom.uid import UID

    ts = UID(uid)
    if not ts.is_transfer_syntax or ts.is_private or ts.is_deflated or not ts.is_little_endian:
        raise Unusual("transfer syntax")
    return ts.is_implicit_VR


def parse(data: bytes) -> Parsed:
    """The file's bytes as :class:`Parsed`; :class:`Unusual` for anything but the plain case."""
    if len(data) < 140 or data[128:132] != b"DICM":
        raise Unusual("no preamble")
    meta, pos = [], 132
    while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
        pos = _element(data, pos, len(data), False, meta)
    ts = next((e[3] for e in meta if e[0] == 0x00020010), None)
    if not meta or not isinstance(ts, bytes):
        raise Unusual("no transfer syntax")
    uid = ts.decode("latin-1").rstrip("\x00 ")
    implicit = _syntax(uid)
    if pos + 8 <= len(data):
        if data[pos:pos + 2] == b"\x00\x00":
            raise Unusual("command set")
        head = data[pos + 4:pos + 6]
        letters = 0x40 < head[0] < 0x5B and 0x40 < head[1] < 0x5B
        if letters == implicit:
            raise Unusual("encoding differs from the transfer syntax")
    body = _dataset(data, pos, len(data), implicit, top=True)
    return Parsed(data[:128], meta, body, uid, implicit)


def _dataset(data: bytes, pos: int, end: int, implicit: bool, top: bool = False, item_end: list | None = None) -> list:
    """The elements from ``pos`` to ``end`` (an undefined-length item: to its delimiter, whose end
    is put in ``item_end``)."""
    out: list = []
    append, unpack, vr_of, long_vrs = out.append, _HEAD.unpack_from, _VR_OF.get, _LONG
    last = -1
    while pos < end:
        if end - pos < 8:
            raise Unusual("stray bytes")
        group, number, raw_vr, short = unpack(data, pos)
        tag = group << 16 | number
        if tag == _ITEM_END and item_end is not None:
            item_end.append(pos + 8)
            return out
        if tag <= last or group == 0xFFFE or group == 2:
            raise Unusual("order")
        last = tag
        vr = None if implicit else vr_of(raw_vr)
        if vr is not None and vr not in long_vrs:  # the common case, inline: a short explicit element
            after = pos + 8 + short
            if after > end:
                raise Unusual("truncated")
            append((tag, vr, short, data[pos + 8:after] if short else empty_value(vr), pos + 8))
            pos = after
            continue
        pos = _element(data, pos, end, implicit, out)
    if item_end is not None:
        raise Unusual("item without its delimiter")
    return out


def _element(data: bytes, pos: int, end: int, implicit: bool, out: list) -> int:
    """Parse the element at ``pos`` into ``out``; the position after it."""
    tag_group, tag_number = _U16.unpack_from(data, pos)
    tag = tag_group << 16 | tag_number
    if implicit:
        length = _U32.unpack_from(data, pos + 4)[0]
        vr = None
        start = pos + 8
        if tag_group & 1:
            raise Unusual("implicit private element")
    else:
        vr = _VR_OF.get(data[pos + 4:pos + 6])
        if vr is None:
            raise Unusual("VR")
        if vr in _LONG:
            if end - pos < 12:
                raise Unusual("truncated")
            length = _U32.unpack_from(data, pos + 8)[0]
            start = pos + 12
        else:
            length = _U16.unpack_from(data, pos + 4)[1]
            start = pos + 8
    sequence = vr == "SQ" or (implicit and dictionary_vr(tag) == "SQ")
    if length == _UNDEFINED:
        if sequence:
            items, after = _items(data, start, end, implicit, None)
            out.append((tag, vr, length, items, start))
            return after
        if tag != _PIXEL_DATA or vr == "UN":
            raise Unusual("undefined length")
        stop = _encapsulated_end(data, start, end)
        out.append((tag, vr, length, data[start:stop], start))
        return stop + 8
    after = start + length
    if after > end:
        raise Unusual("truncated")
    if sequence:
        items, _ = _items(data, start, after, implicit, after)
        out.append((tag, vr, length, items, start))
    elif length:
        out.append((tag, vr, length, data[start:after], start))
    else:
        out.append((tag, vr, 0, empty_value(vr), start))
    return after


@functools.lru_cache(maxsize=64)
def empty_value(vr: str | None):
    """The value pydicom gives an empty element as read (b"" for text VRs, None otherwise)."""
    from pydicom.dataelem import empty_value_for_VR

    return empty_value_for_VR(vr, raw=True)


def _items(data: bytes, pos: int, end: int, implicit: bool, bound: int | None) -> tuple[Items, int]:
    """A sequence's items from ``pos``: up to ``bound`` (defined length) or its delimiter."""
    items = Items()
    while True:
        if bound is not None and pos == bound:
            return items, pos
        if end - pos < 8:
            raise Unusual("truncated sequence")
        group, number, length = _IMPLICIT.unpack_from(data, pos)
        tag = group << 16 | number
        if tag == _SEQ_END:
            if bound is not None:
                raise Unusual("delimiter in a defined-length sequence")
            items.stop = pos
            return items, pos + 8
        if tag != _ITEM:
            raise Unusual("not an item")
        at, pos = pos, pos + 8
        if length == _UNDEFINED:
            item_end: list = []
            items.append(Item(_nested(data, pos, end, implicit, item_end), at, True))
            pos = item_end[0]
        else:
            if pos + length > end:
                raise Unusual("truncated item")
            items.append(Item(_nested(data, pos, pos + length, implicit, None), at, False))
            pos += length


def _nested(data: bytes, pos: int, end: int, implicit: bool, item_end: list | None) -> list:
    if not implicit and end - pos >= 8 and data[pos:pos + 4] != b"\xfe\xff\x0d\xe0":
        head = data[pos + 4:pos + 6]
        if not (0x40 < head[0] < 0x5B and 0x40 < head[1] < 0x5B):
            raise Unusual("implicit VR inside an explicit sequence")
    elements = _dataset(data, pos, end, implicit, item_end=item_end)
    if any(e[0] == 0x00080005 for e in elements):
        raise Unusual("an item with its own character set")
    return elements


def _encapsulated_end(data: bytes, pos: int, end: int) -> int:
    """Where the sequence delimiter of encapsulated pixel data starting at ``pos`` lies: its items
    walked, and the first delimiter pattern (what pydicom searches for) right there."""
    at = pos
    while True:
        if end - at < 8:
            raise Unusual("truncated pixel data")
        group, number, length = _IMPLICIT.unpack_from(data, at)
        tag = group << 16 | number
        if tag == _SEQ_END:
            break
        if tag != _ITEM or length == _UNDEFINED or at + 8 + length > end:
            raise Unusual("pixel data items")
        at += 8 + length
    if data.find(_SEQ_END_BYTES, pos) != at or data[at + 4:at + 8] != b"\x00\x00\x00\x00":
        raise Unusual("delimiter pattern inside the pixel data")
    return at


def private_vr(elements: list, tag: int, codec: str) -> str:
    """The VR pydicom gives a private UN element: its private dictionary's, by its creator."""
    from pydicom.datadict import private_dictionary_VR

    if 0x0010 <= tag & 0xFFFF <= 0x00FF:
        return "LO"  # a private creator
    if not tag & 0xFF00:
        return "UN"
    creator_tag = (tag & 0xFFFF0000) | ((tag & 0xFFFF) >> 8)
    creator = next((e for e in elements if e[0] == creator_tag), None)
    if creator is None or not creator[3]:
        return "UN"
    if creator[1] != "LO" or b"\\" in creator[3]:
        raise Unusual("private creator")
    try:
        return private_dictionary_VR(tag, creator[3].decode(codec).rstrip("\x00 "))
    except KeyError:
        return "UN"
    except UnicodeDecodeError:
        raise Unusual("private creator") from None
