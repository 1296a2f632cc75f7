"""pydicom's data set of a plain Part 10 file, built from its byte-level parse.

Anonymize de-identifies a pydicom ``Dataset`` (:mod:`haven.deid.header`), but most of
``pydicom.dcmread``'s time is its element generator.  :func:`dataset` builds from
:func:`haven.deid.rawread.parse` what ``dcmread(path, force=True)`` returns for the same file, as
pydicom builds it: the File Meta Information (its first element converted, as pydicom's meta
reader does), raw elements with their positions, sequences left raw (defined-length ones as pydicom
leaves them; undefined-length ones, which pydicom reads at once, as their items up to the delimiter,
read by pydicom into the same items when they are touched: most are removed untouched),
encapsulated pixel data up to its delimiter, and the ``FileDataset`` around them.  The tests
compare the anonymized outputs of both readers byte for byte (tests/test_fastheader.py).  Files :func:`~haven.deid.rawread.parse` does not
take raise :class:`~haven.deid.rawread.Unusual` (the caller uses ``dcmread``).
"""

from __future__ import annotations

from haven.deid.rawread import Unusual, dictionary_vr, empty_value, parse


def dataset(data: bytes, filename: str):
    """``pydicom.dcmread(filename, force=True)`` of the file whose bytes are ``data``."""
    from pydicom.charset import default_encoding
    from pydicom.dataset import FileDataset, FileMetaDataset

    parsed = parse(data)
    inner = _dataset(data, parsed.meta, False, default_encoding)
    file_meta = FileMetaDataset(inner)
    file_meta.set_original_encoding(False, True, default_encoding)
    if file_meta._dict:
        try:
            file_meta[next(iter(file_meta._dict))]  # as pydicom's meta reader: converts the first element
        except NotImplementedError:
            raise Unusual("meta group") from None
    body = _dataset(data, parsed.body, parsed.implicit, default_encoding)
    ds = FileDataset(filename, body, parsed.preamble, file_meta, parsed.implicit, True)
    ds.set_original_encoding(parsed.implicit, True, body._character_set)
    return ds


def _dataset(data: bytes, elements: list, implicit: bool, parent_encoding):
    """pydicom's ``read_dataset`` of ``elements``."""
    from pydicom.charset import convert_encodings
    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.dataset import Dataset
    from pydicom.tag import BaseTag

    raw: dict = {}
    for tag, vr, length, value, at in elements:
        key = BaseTag(tag)
        if isinstance(value, list) and length == 0xFFFFFFFF:
            # left raw, its items up to the delimiter: read on access like a defined-length one (most
            # sequences are removed unread), into the items pydicom's reader gives
            value, vr = data[at:value.stop], "SQ"
        elif isinstance(value, list):  # a defined-length sequence stays raw, as pydicom leaves it
            value = data[at:at + length] if length else empty_value(vr)
        elif length == 0xFFFFFFFF and vr is None:
            vr = dictionary_vr(tag)  # implicit-VR encapsulated pixel data: as pydicom names it
        raw[key] = RawDataElement(key, vr, length, value, at, implicit, True)
    ds = Dataset(raw, parent_encoding=parent_encoding)
    if 0x00080005 in raw:
        encoding = convert_encodings(convert_raw_data_element(raw[BaseTag(0x00080005)]).value)
    else:
        encoding = parent_encoding
    ds.set_original_encoding(implicit, True, encoding)
    return ds
