"""Writing de-identified files: atomically (a temporary name in the target folder, then a rename),
DICOM through the raw writer (:mod:`haven.deid.dicomraw`: raw elements as their original bytes) or
pydicom's where the data set needs it, and the method code items every output carries."""

from __future__ import annotations

import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from haven.deid import dicomraw
from haven.deid.errors import AnonymizeError

TMP_PREFIX = ".tmp-"  # a killed run's leftovers are found (and removed) by this prefix


class Meta(NamedTuple):
    """What the File Meta Information of an output says: its SOP class and instance, its syntax."""
    sop_class: str
    sop_instance: str
    transfer_syntax: str


METHOD_CODES = BaseTag(0x00120064)  # DeidentificationMethodCodeSequence


def method_items(codes) -> list[Dataset]:
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    return items


@lru_cache(maxsize=64)
def method_codes(codes: tuple, implicit: bool) -> RawDataElement:
    """The DeidentificationMethodCodeSequence, encoded once per option set and encoding."""
    return dicomraw.sequence_element(METHOD_CODES, method_items(codes), implicit)


def safe_name(name: str) -> str:
    """A UID as a file name: only digits and dots can appear (anything else is hashed)."""
    if re.fullmatch(r"[0-9.]{1,64}", name) and name not in (".", ".."):
        return name
    raise AnonymizeError("invalid UID after de-identification")


def fix_encoding(ds, transfer_syntax: str) -> None:
    """A data set read with another encoding than its transfer syntax (e.g. implicit VR in an
    explicit-VR file) needs concrete VRs before it can be written in the declared syntax."""
    from pydicom.filewriter import correct_ambiguous_vr

    ts = pydicom.uid.UID(transfer_syntax)
    if ts.is_private or not ts.is_transfer_syntax:
        return
    if ts.is_implicit_VR:
        return
    if not any(e.VR is None or " or " in e.VR for e in ds._dict.values()):
        return
    for t in list(ds.keys()):
        ds[t]  # noqa: B018 - convert every raw element (gives it its dictionary VR)
    correct_ambiguous_vr(ds, ts.is_little_endian)
    if ts.is_compressed and 0x7FE00010 in ds and " or " in ds[0x7FE00010].VR:
        ds[0x7FE00010].VR = "OB"


def write_dicom(ds, target: Path, meta: Meta, folder_exists: bool = False) -> None:
    """Write ``ds`` to ``target`` atomically (``folder_exists``: its folder is known to exist)."""
    try:
        fix_encoding(ds, meta.transfer_syntax)
    except Exception as e:
        raise AnonymizeError(f"DICOM encoding could not be fixed ({type(e).__name__})") from None
    fd, tmp = _tmp_file(target, folder_exists)
    try:
        _save(ds, os.fdopen(fd, "wb"), tmp, meta)
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise AnonymizeError(f"DICOM write failed ({type(e).__name__})") from None
        raise


IMPLEMENTATION_NAME = "PYDICOM " + ".".join(pydicom.__version__.split(".")[:3])


def _save(ds, fp, path: str, meta: Meta) -> None:
    """Write ``ds`` as a DICOM file to ``fp`` (the open file ``path``, closed here): raw elements as
    their original bytes (:mod:`haven.deid.dicomraw`), through pydicom's writer (to ``path``) when the
    data set needs it (big endian, deflate, another encoding)."""
    ts = pydicom.uid.UID(meta.transfer_syntax)
    try:
        with fp:
            header = dicomraw.file_meta(meta.sop_class, meta.sop_instance, meta.transfer_syntax,
                                        PYDICOM_IMPLEMENTATION_UID, IMPLEMENTATION_NAME)
            dicomraw.write_file(fp, ds, header, ts)
        return
    except dicomraw.Unsupported:
        pass
    file_meta = FileMetaDataset()
    file_meta.FileMetaInformationVersion = b"\x00\x01"
    file_meta.MediaStorageSOPClassUID = meta.sop_class
    file_meta.MediaStorageSOPInstanceUID = meta.sop_instance
    file_meta.TransferSyntaxUID = meta.transfer_syntax
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    file_meta.ImplementationVersionName = IMPLEMENTATION_NAME
    ds.file_meta = file_meta
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=True)


def _tmp_file(target: Path, folder_exists: bool = False) -> tuple[int, str]:
    """A new temporary file beside ``target``, open: (descriptor, path)."""
    if not folder_exists:
        target.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX, suffix=".part")


def _tmp_path(target: Path) -> str:
    fd, tmp = _tmp_file(target)
    os.close(fd)
    return tmp


def write_bytes(data: bytes, target: Path) -> None:
    tmp = _tmp_path(target)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
