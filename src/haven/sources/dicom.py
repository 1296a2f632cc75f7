"""DICOM: Part 10 files (with the 128-byte preamble) and bare datasets, read by pydicom.

Ingest reads every header of a cohort, so the common case is fast: a plain Part 10 file (little
endian, not deflated, well formed: :mod:`haven.deid.rawread`) is parsed from its bytes in one pass
and its manifest fields, identifiers and pixel checks come from that parse (:func:`_parsed_header`:
the same row and identifiers as the pydicom path, tests/test_fastheader.py compares them on real
corpora).  Any other file, and any file to quarantine, is read by pydicom: a native little-endian
one with its File Meta Information parsed here (:func:`_read_native`, as pydicom reads it), its
values decoded from the raw bytes (:mod:`haven.sources.dicomheader`) and its pixel data checked by
length instead of decoded; everything else through ``pydicom.dcmread``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from haven.sources.base import BY_CONTENT, GUESS, NO, NotMine, Quarantine, Reader, reason
from haven.deid.rawread import Unusual, parse
from haven.sources.dicomheader import age_years, codec_of, identifiers, parsed_identifiers, text, uint
from haven.sources.dicompixels import CODECS as _CODEC, check_encapsulated as _check_encapsulated
from haven.sources.masks import SEG_SOP_CLASS

def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0002 or 0008 tag (either byte order)."""
    if len(head) < 8:
        return False
    le = int.from_bytes(head[:2], "little")
    be = int.from_bytes(head[:2], "big")
    return le in (0x0002, 0x0008) or be in (0x0002, 0x0008)


_NATIVE_LE = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}  # syntax -> implicit VR


def _read_native(fh):
    """A Part 10 file in Implicit or Explicit VR Little Endian, read as pydicom reads it but with
    the File Meta Information parsed here (pydicom's own meta reader costs as much as the rest of
    a small header); None for anything else (the caller uses ``dcmread``)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.tag import BaseTag

    from haven.deid.dicomraw import LONG_VRS

    fh.seek(132)
    meta = {}
    while True:
        head = fh.read(8)
        if len(head) < 8:
            return None
        group, element = int.from_bytes(head[:2], "little"), int.from_bytes(head[2:4], "little")
        if group != 2:
            fh.seek(-8, 1)
            break
        vr = head[4:6]
        if not (b"AA" <= vr <= b"ZZ"):
            return None  # a meta group not in explicit VR: pydicom knows how to cope
        if vr.decode("latin-1") in LONG_VRS:
            length = int.from_bytes(fh.read(4), "little")
        else:
            length = int.from_bytes(head[6:8], "little")
        if length == 0xFFFFFFFF or length > 1 << 16:
            return None
        tag = BaseTag(group << 16 | element)
        value = fh.read(length)
        if len(value) < length:
            return None
        meta[tag] = RawDataElement(tag, vr.decode(), length, value, 0, False, True)
    ts = meta.get(0x00020010)
    implicit = _NATIVE_LE.get(ts.value.rstrip(b"\x00 ").decode("latin-1")) if ts is not None else None
    if implicit is None or head[:2] == b"\x00\x00":
        return None  # compressed, big endian, deflated, no syntax, or a command set: pydicom's reader
    ds = read_dataset(fh, implicit, True)
    ds.file_meta = FileMetaDataset(meta)
    return ds


def _read_dicom(source, has_preamble: bool, check_pixels: bool, path: Path):
    import pydicom
    from pydicom import uid

    ds = None
    if has_preamble:
        try:
            ds = _read_native(source)
        except Exception:
            ds = None
        if ds is None or len(ds) == 0:
            source.seek(0)
            ds = None
    if ds is None:
        ds = pydicom.dcmread(source, force=not has_preamble)
    if not has_preamble and not ("SOPClassUID" in ds or "PatientID" in ds):
        raise NotMine()
    if "TransferSyntaxUID" not in ds.file_meta:
        # no file meta (bare dataset): the reader detected the encoding; name it so pixels decode
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is not None:
            ds.file_meta.TransferSyntaxUID = (
                uid.ImplicitVRLittleEndian if implicit
                else uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
            )
    if len(ds) == 0:
        raise Quarantine("DICOM file with no data elements after the header (truncated or empty)")
    if "PixelData" not in ds:
        raise Quarantine("no pixel data")
    for kw in ("Rows", "Columns"):
        if not uint(ds, kw):
            raise Quarantine(f"pixel data without {kw}")
    if check_pixels:
        _check_pixels(ds, path)
    return ds


@functools.lru_cache(maxsize=64)
def _is_native(transfer_syntax: str) -> bool:
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    return bool(transfer_syntax) and ts.is_transfer_syntax and not ts.is_compressed


def _check_pixels(ds, path: Path) -> None:
    """Quarantine pixel data that preprocess could not decode, without decoding it: native data by
    its length against the image description, encapsulated data by its fragment structure and the
    codec's own header (:func:`_check_encapsulated`).  Decoding every image at ingest cost 80 % of
    ingest's time on compressed CT, and preprocess decodes each image anyway."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    try:
        rows, cols, bits = uint(ds, "Rows") or 0, uint(ds, "Columns") or 0, uint(ds, "BitsAllocated") or 0
        samples = uint(ds, "SamplesPerPixel") or 1
        frames = int(text(ds, "NumberOfFrames") or 1)
        photometric = text(ds, "PhotometricInterpretation")
    except Exception as e:
        raise Quarantine(f"pixel data without a usable image description: {reason(e, path)}") from None
    image = _Image(rows, cols, samples, frames, bits)
    if _is_native(ts) and 0x7FE00008 not in ds._dict and 0x7FE00009 not in ds._dict:
        _check_native(ds, image, photometric)
        return
    pixels = ds.get_item(0x7FE00010)
    data = getattr(pixels, "value", None)
    if ts not in _CODEC or not isinstance(data, (bytes, bytearray)) or pixels.length != 0xFFFFFFFF:
        _decode_one_frame(ds, path)  # float data, or a codec whose structure is not checked here
        return
    if bits not in (8, 16, 32, 64) or min(rows, cols, samples, frames) < 1:
        raise Quarantine("pixel data with an impossible image description")
    _check_decoder(ts)
    _check_encapsulated(ds, bytes(data), _CODEC[ts], image, path)


class _Image(NamedTuple):
    rows: int
    cols: int
    samples: int
    frames: int
    bits: int


def _check_native(ds, image: _Image, photometric: str) -> None:
    """Native data needs no decoder: it decodes when it holds the bytes the description asks for."""
    rows, cols, samples, frames, bits = image
    if bits not in (1, 8, 16, 32, 64) or min(rows, cols, samples, frames) < 1:
        raise Quarantine("pixel data with an impossible image description")
    expected = (rows * cols * samples * frames * bits + 7) // 8
    if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        expected = expected * 2 // 3
    pixels = ds.get_item(0x7FE00010).value  # raw bytes, not converted
    if pixels is None or len(pixels) < expected:
        raise Quarantine(f"pixel data cannot be decoded: {len(pixels or b'')} bytes for an image of "
                         f"{expected} bytes (truncated?)")
    # more is excess padding, which the decoder drops (so the file is accepted, as a decode would),
    # except YBR_FULL_422 data of the full size: the photometric value is wrong, the decoder refuses it
    full = expected // 2 * 3
    if photometric == "YBR_FULL_422" and len(pixels) >= full + full % 2:
        raise Quarantine(f"pixel data does not match the image description: {len(pixels)} bytes, the size of "
                         "full-resolution colour, for YBR_FULL_422 (which holds two thirds of that)")


@functools.lru_cache(maxsize=64)
def _decoder_problem(transfer_syntax: str) -> str:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return "no decoder exists for its transfer syntax"
    if not decoder.is_available:
        return "no decoder for its transfer syntax is installed (see pydicom's pixel data plugins)"
    return ""


def _check_decoder(transfer_syntax: str) -> None:
    problem = _decoder_problem(transfer_syntax)
    if problem:
        raise Quarantine(f"pixel data cannot be decoded: {problem}")


def _decode_one_frame(ds, path: Path) -> None:
    """Where the structure tells nothing (float pixel data, a codec not checked here), decode one
    frame, raw (no colour conversion): enough to know that the decoder takes the data."""
    from pydicom.pixels import pixel_array

    if getattr(ds, "shim", False):
        raise Unusual("pixel data checked by decoding")
    try:
        pixel_array(ds, index=0, raw=True)
    except Exception as e:
        raise Quarantine(f"pixel data cannot be decoded: {reason(e, path)}") from None


@contextlib.contextmanager
def _quiet_pydicom():
    """Silence pydicom's warnings and log records: they may quote header values (PHI)."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            logger.setLevel(level)


class DicomReader(Reader):
    kind = "dicom"
    description = "DICOM"
    in_series = True

    def recognise(self, head: bytes, suffix: str, others: frozenset[str]) -> int:
        if len(head) == 132 and head[128:132] == b"DICM":
            return BY_CONTENT
        # a bare dataset (no preamble) has no signature: a guess that gives way to a named image
        if suffix not in others and _looks_like_bare_dicom(head):
            return GUESS
        return NO

    def header(self, path: Path, rel: str, fh, head: bytes, *, check_pixels: bool):
        fh.seek(0)  # read from the open file: one open per file
        part10 = len(head) == 132 and head[128:132] == b"DICM"
        if part10:
            try:
                return _parsed_header(fh.read(), path, rel, check_pixels)
            except Exception:  # Unusual, or anything unforeseen: pydicom's read decides
                fh.seek(0)
        ds = _read_dicom(fh, part10, check_pixels, path)
        cs = codec_of(ds)
        return _row(ds, cs, rel), list(identifiers(ds, codec=cs))

    def pixels(self, path: Path, mode: str, windows: list[dict]) -> np.ndarray:
        return decode_dicom(path, mode, windows)

    def slice_position(self, path: str) -> tuple[float, float]:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["ImagePositionPatient", "InstanceNumber"])
        try:
            z = float(ds.ImagePositionPatient[2])
        except Exception:
            z = float("nan")
        try:
            number = float(ds.InstanceNumber)
        except Exception:
            number = float("nan")
        return z, number

    def quiet(self):
        return _quiet_pydicom()


class _ParsedSet:
    """The top level of a :func:`haven.deid.rawread.parse` as the few parts of a pydicom data set that
    :mod:`haven.sources.dicomheader` and the pixel checks read (raw elements, the transfer
    syntax); anything that would need pydicom raises :class:`Unusual`."""

    shim = True
    is_little_endian = True

    def __init__(self, parsed):
        self._dict = _RawElements((e[0], e) for e in parsed.body)
        self._dict.implicit = parsed.implicit
        self.file_meta = {"TransferSyntaxUID": parsed.transfer_syntax}

    def get_item(self, tag: int):
        return self._dict.get(tag)

    def get(self, *_):
        raise Unusual("a value pydicom would convert")


class _RawElements(dict):
    """tag -> parsed element, given as a pydicom ``RawDataElement`` when asked for (few are)."""

    implicit = False

    def get(self, tag, default=None):
        from pydicom.dataelem import RawDataElement
        from pydicom.tag import BaseTag

        e = super().get(tag)
        if e is None:
            return default
        tag, vr, length, value, at = e
        return RawDataElement(BaseTag(tag), vr, length, None if isinstance(value, list) else value, at,
                              self.implicit, True)

    def __getitem__(self, tag):
        if tag not in self:
            raise KeyError(tag)
        return self.get(tag)


def _parsed_header(data: bytes, path: Path, rel: str, check_pixels: bool):
    """:meth:`DicomReader.header` of a plain Part 10 file from its bytes (:mod:`haven.deid.rawread`),
    the same row and identifiers as through pydicom; :class:`Unusual` for anything else, and for a
    file to quarantine (pydicom's read then words the reason)."""
    parsed = parse(data)
    ds = _ParsedSet(parsed)
    if 0x7FE00010 not in ds._dict or not uint(ds, "Rows") or not uint(ds, "Columns"):
        raise Unusual("no image")
    cs = codec_of(ds)
    if cs is None:
        raise Unusual("a character set pydicom decodes")
    if check_pixels:
        try:
            _check_pixels(ds, path)
        except Quarantine:
            raise Unusual("quarantined") from None
    return _row(ds, cs, rel), list(parsed_identifiers(parsed.body, cs))


def _row(ds, cs: str | None, rel: str) -> dict:
    """The manifest fields of a DICOM data set."""

    def value(kw):
        return text(ds, kw, cs)

    return {
        "patient_id": value("PatientID") or value("StudyInstanceUID") or str(PurePosixPath(rel).with_suffix("")),
        "study_uid": value("StudyInstanceUID"),
        "series_uid": value("SeriesInstanceUID"),
        "sop_uid": value("SOPInstanceUID"),
        "accession": value("AccessionNumber"),
        "modality": value("Modality"),
        "sex": value("PatientSex").upper(),
        "age": age_years(ds, cs),
        "site": value("InstitutionName"),
        "rows": uint(ds, "Rows"),
        "cols": uint(ds, "Columns"),
        # a DICOM-SEG is a mask of other instances, never a sample
        "role": "mask" if value("SOPClassUID") == SEG_SOP_CLASS else "image",
    }


def decode_dicom(path: Path, mode: str, windows: list[dict]) -> np.ndarray:
    """DICOM → float32 (C, H, W) in [0, 1]: HU windows for ``ct``, VOI/min-max otherwise."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3:  # colour
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        rgb = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else max(arr.max(), 1))
        out = rgb.transpose(2, 0, 1)
        return out.mean(axis=0, keepdims=True) if mode == "gray" else out
    if mode == "ct":
        hu = apply_modality_lut(arr, ds).astype(np.float32)
        chans = [np.clip((hu - (w["center"] - w["width"] / 2)) / w["width"], 0.0, 1.0) for w in windows]
        return np.stack(chans)
    img = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    return img[None]
