"""DICOM at the byte level, for de-identification at the speed of a plain copy.

pydicom reads every element as a raw value (bytes) and decodes it only when it is touched.  The
de-identifier touches few of them: it deletes elements, and replaces a handful of string values
(UIDs, dates, names).  This module lets it do both without decoding anything else:

* :func:`strings` reads the values of a raw string element (UI, DA, DT...) exactly as pydicom
  would decode them, without building a ``DataElement``;
* :func:`text_element` builds a raw element from new ASCII values;
* :func:`write_file` writes a data set in the DICOM file format: every raw element as its tag,
  VR, length and original bytes, sequences rebuilt around their (cleaned) items, and any element
  the de-identifier converted through pydicom's own element writer.  The result is byte for byte
  what ``Dataset.save_as(enforce_file_format=True)`` writes (the tests compare them); what this
  writer does not handle (big endian, deflate, a change of encoding) raises :class:`Unsupported`
  and the caller uses pydicom.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Callable

from pydicom.datadict import DicomDictionary
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_IMPLICIT = struct.Struct("<HHL")
_EXPLICIT16 = struct.Struct("<HH2sH")
_EXPLICIT32 = struct.Struct("<HH2s2xL")
_ITEM = struct.Struct("<HHL")
_UNDEFINED = 0xFFFFFFFF
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_PIXEL_DATA = 0x7FE00010
LONG_VRS = frozenset(EXPLICIT_VR_LENGTH_32)  # explicit VRs with a reserved field and a 4-byte length
_PADDED_WITH_NUL = frozenset({"UI", "OB", "UN"})


class Unsupported(Exception):
    """The data set needs pydicom's writer (another encoding, big endian, deflate...)."""


# ---------------------------------------------------------------------------------------------
# raw values


def strings(value: bytes, vr: str) -> list[str]:
    """The values of the raw bytes of a string element as pydicom decodes UI, DA, DT, TM, CS... (ISO 8859-1,
    trailing spaces and NULs removed, split on backslashes); UIDs are also stripped."""
    if not value:
        return []
    items = value.decode("iso8859").rstrip(" \x00").split("\\")
    if vr == "UI":
        items = [v.strip() for v in items]
    return items if items != [""] else []


# string VRs whose values are plain ISO 8859-1 whatever the character set
ASCII_VRS = frozenset({"UI", "DA", "DT", "TM", "CS", "AS", "IS", "DS", "AE"})


def vr_of(ds, tag: int) -> str:
    """The VR of an element as read (raw or converted, without converting it); the dictionary's
    when the file gave none (implicit VR) or UN."""
    vr = ds._dict[tag].VR
    if vr is None or vr == "UN":
        entry = DicomDictionary.get(tag)
        vr = entry[0] if entry else "UN"
    return vr


def values(ds, tag: int, vr: str | None = None) -> list[str]:
    """An element's values as strings, from the raw bytes when it is still raw and of an ASCII VR
    (UIDs, code strings, dates, numbers as strings): the element is then not converted."""
    elem = ds._dict[tag]
    vr = vr or vr_of(ds, tag)
    if type(elem) is RawDataElement and elem.value is not None and vr in ASCII_VRS:
        return strings(elem.value, vr)
    value = ds[tag].value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def text(ds, tag: int) -> str:
    """One element's value(s) as text, backslash-separated; '' when absent (see :func:`values`)."""
    return "\\".join(values(ds, tag)) if tag in ds._dict else ""


def number(ds, tag: int) -> int | None:
    """A US/UL value (Rows, BitsAllocated...) from its raw bytes when it is raw; None if absent."""
    elem = ds._dict.get(tag)
    if elem is None:
        return None
    if (type(elem) is RawDataElement and elem.value is not None and len(elem.value) in (2, 4)
            and ds.original_encoding[1] and vr_of(ds, tag) in ("US", "UL")):
        return int.from_bytes(elem.value, "little")
    value = ds[tag].value
    return None if value in (None, "") else int(value)


def text_element(tag: int, vr: str, values: list[str], implicit: bool) -> RawDataElement | None:
    """A raw (little endian) element holding ASCII ``values``, or None when a value is not ASCII
    (the caller then uses a ``DataElement``, encoded in the data set's character set)."""
    text = "\\".join(values)
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if len(data) & 1:
        data += b"\x00" if vr == "UI" else b" "
    return RawDataElement(BaseTag(tag), vr, len(data), data, 0, implicit, True)


def sequence_element(tag: int, items, implicit: bool) -> RawDataElement:
    """A raw (little endian) sequence of new ``items`` (data sets of ``DataElement``), encoded once
    and shared between files; pydicom decodes it like any other sequence read from a file."""
    body = _items(items, implicit, ["iso8859"])
    return RawDataElement(BaseTag(tag), "SQ", len(body), bytes(body), 0, implicit, True)


# ---------------------------------------------------------------------------------------------
# writing


def _header(tag: int, vr: str | None, length: int, implicit: bool) -> bytes:
    if implicit:
        return _IMPLICIT.pack(tag >> 16, tag & 0xFFFF, length)
    if vr in LONG_VRS:
        return _EXPLICIT32.pack(tag >> 16, tag & 0xFFFF, vr.encode(), length)
    return _EXPLICIT16.pack(tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _element(write: Callable[[bytes], object], elem, implicit: bool, encodings) -> None:
    """One element through pydicom's own element writer (values it converted or we created)."""
    buf = DicomBytesIO()
    buf.is_implicit_VR = implicit
    buf.is_little_endian = True
    write_data_element(buf, elem, encodings)
    write(buf.getvalue())


def _items(items, implicit: bool, encodings) -> bytearray:
    """The items of a sequence, each with its length (or undefined, as it was read)."""
    body = bytearray()
    for item in items:
        inner = bytearray()
        _dataset(inner.extend, item, implicit, encodings)
        if getattr(item, "is_undefined_length_sequence_item", False):
            body += _ITEM.pack(0xFFFE, 0xE000, _UNDEFINED)
            body += inner
            body += _ITEM_END
        else:
            body += _ITEM.pack(0xFFFE, 0xE000, len(inner))
            body += inner
    return body


def _dataset(write: Callable[[bytes], object], ds, implicit: bool, encodings, top: bool = False,
             compressed: bool = False) -> None:
    elements = ds._dict
    has_raw = any(type(e) is RawDataElement for e in elements.values())
    if has_raw and (ds.original_encoding != (implicit, True)
                    or ds.original_character_set != ds._character_set):
        raise Unsupported("data set read in another encoding or character set")
    charset = elements.get(0x00080005)
    if charset is not None:
        encodings = ds.get("SpecificCharacterSet", encodings)
    for tag in sorted(elements):
        if not tag & 0xFFFF and tag >> 16 > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        elem = elements[tag]
        if top and tag == _PIXEL_DATA:
            elem = ds[tag]
            elem.is_undefined_length = compressed
            _element(write, elem, implicit, encodings)
            continue
        if type(elem) is RawDataElement:
            value = elem.value
            if value is None:
                _element(write, ds[tag], implicit, encodings)
                continue
            vr = elem.VR
            if not implicit and (vr is None or len(vr) != 2):
                raise Unsupported("raw element without a concrete VR")
            undefined = elem.length == _UNDEFINED
            if not implicit and not undefined and len(value) > 0xFFFF and vr not in LONG_VRS:
                vr = "UN"  # as pydicom does (PS3.5 6.2.2)
            write(_header(tag, vr, _UNDEFINED if undefined else len(value), implicit))
            write(value)
            if undefined:
                write(_SEQUENCE_END)
        elif elem.VR == "SQ":
            body = _items(elem.value or (), implicit, encodings)
            undefined = elem.is_undefined_length
            write(_header(tag, "SQ", _UNDEFINED if undefined else len(body), implicit))
            write(bytes(body))
            if undefined:
                write(_SEQUENCE_END)
        else:
            _element(write, elem, implicit, encodings)


def _meta_element(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) & 1:
        value += b"\x00" if vr in _PADDED_WITH_NUL else b" "
    return _header(tag, vr, len(value), False) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, implementation_uid: str,
              implementation_name: str) -> bytes:
    """The File Meta Information group (Explicit VR Little Endian), group length first."""
    body = b"".join([
        _meta_element(0x00020001, "OB", b"\x00\x01"),
        _meta_element(0x00020002, "UI", sop_class.encode("ascii")),
        _meta_element(0x00020003, "UI", sop_instance.encode("ascii")),
        _meta_element(0x00020010, "UI", transfer_syntax.encode("ascii")),
        _meta_element(0x00020012, "UI", implementation_uid.encode("ascii")),
        _meta_element(0x00020013, "SH", implementation_name.encode("ascii")),
    ])
    return _header(0x00020000, "UL", 4, False) + struct.pack("<L", len(body)) + body


def write_file(fp: BinaryIO, ds, meta: bytes, transfer_syntax) -> None:
    """Write ``ds`` to ``fp`` in the DICOM file format: 128 zero bytes, ``DICM``, ``meta`` (from
    :func:`file_meta`) and the data set in ``transfer_syntax`` (a pydicom ``UID``).  Raises
    :class:`Unsupported` for what it leaves to pydicom; nothing is written then."""
    if (not transfer_syntax.is_transfer_syntax or transfer_syntax.is_private
            or not transfer_syntax.is_little_endian or transfer_syntax.is_deflated):
        raise Unsupported(f"transfer syntax {transfer_syntax}")
    implicit = transfer_syntax.is_implicit_VR
    chunks: list[bytes] = [b"\x00" * 128, b"DICM", meta]
    _dataset(chunks.append, ds, implicit, ["iso8859"], top=True, compressed=transfer_syntax.is_compressed)
    fp.writelines(chunks)
