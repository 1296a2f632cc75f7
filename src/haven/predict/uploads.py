"""What the REST service (:mod:`haven.predict.serve`) does with a request's bytes before a model
sees them, all in memory: nothing of a request is ever written to disk.

* the body is read from the ASGI stream into memory, refused (413) past the request limit, the
  ``Content-Length`` checked first.  Starlette's own form parser is not used: it spools every
  upload over 1 MiB to a temporary *file* (``SpooledTemporaryFile``), so the multipart body is
  split here with python-multipart's streaming parser into in-memory parts;
* each part is checked before its pixels are decoded: a kind haven reads (else 415), for DICOM a
  header read with ``stop_before_pixels`` and **de-identified in memory** at once
  (:func:`haven.deid.header.clean`, the PS3.15 basic profile the anonymize stage applies, with a
  key that lives only in this process), pixel data present, the modality the model was trained on
  and the image size (rows × columns, frames) under the limits (413);
* a reason that reaches the client never reaches the log: a :class:`Rejected` carries its reason
  to the response only.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
# the pixel data tags (7FE0,0010 / 0008 / 0009) in either byte order: where stop_before_pixels stops
PIXEL_TAGS = frozenset(t.to_bytes(2, o) + e.to_bytes(2, o) for t in (0x7FE0,) for e in (0x10, 0x08, 0x09)
                       for o in ("little", "big"))
# a key for the in-memory de-identification that exists only in this process (UIDs of a request
# are remapped with it and no one can map them back: nothing of the header is kept anyway)
_KEY = os.urandom(32)


class Rejected(Exception):
    """A request the service refuses: the HTTP status and the reason (for the client, never logged)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What one request may carry; all checked before any pixel is decoded."""

    request_bytes: int = 32 * MiB  # the whole body
    files: int = 64  # parts named ``files``
    pixels: int = 4096 * 4096  # rows × columns of one frame (a DICOM's header, an image's)
    frames: int = 256  # frames of a multi-frame DICOM (decoded whole before the middle one is used)


@dataclass
class Upload:
    """One file of a request: its bytes and the suffix of the name it came with (the name itself is
    dropped as it is parsed: it may carry a patient's name)."""

    data: bytes
    suffix: str


async def read_body(stream, content_length: str | None, limit: int) -> bytes:
    """The request body from its ASGI chunk stream, refused past ``limit`` bytes."""
    too_big = Rejected(413, f"request larger than the limit of {limit} bytes ({limit / MiB:g} MiB): send fewer "
                            "or smaller files per request")
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in stream:
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def split_form(body: bytes, content_type: str, limits: Limits, field: str = "files") -> list[Upload]:
    """A ``multipart/form-data`` body → its file parts named ``field``, in order, in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise Rejected(415, f"send the files as multipart/form-data, each in a part named {field!r} "
                            f"(curl -F {field}=@image.dcm ...)")
    parts = _Parts()
    try:
        parser = MultipartParser(params[b"boundary"], parts.callbacks())
        parser.write(body)
        parser.finalize()
    except Exception as e:
        raise Rejected(400, f"malformed multipart body ({type(e).__name__})") from None
    out = []
    for headers, data in parts.parts:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        if options.get(b"name") == field.encode() and b"filename" in options:
            name = options[b"filename"].decode("utf-8", "replace")
            out.append(Upload(bytes(data), Path(name).suffix.lower()))
    if not out:
        raise Rejected(422, f"no file in the request: send each file in a multipart part named {field!r}")
    if len(out) > limits.files:
        raise Rejected(413, f"{len(out)} files in one request, more than the limit of {limits.files}")
    return out


class _Parts:
    """The parts of a multipart body as python-multipart's callbacks hand them over: (headers, data)."""

    def __init__(self):
        self.parts: list[tuple[dict[bytes, bytes], bytearray]] = []
        self._name = self._value = b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._header_value,
                "on_header_end": self._header_end, "on_part_data": self._data}

    def _begin(self) -> None:
        self.parts.append(({}, bytearray()))

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self.parts[-1][0][self._name.lower()] = self._value
        self._name = self._value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1][1].extend(data[start:end])


def check(upload: Upload, mode: str, limits: Limits) -> str:
    """The kind of an upload (``dicom`` or ``image``) once it passed every check that needs no pixel
    decoding; :class:`Rejected` with the reason otherwise."""
    from haven.sources import NOT_SUPPORTED, kind_of

    if not upload.data:
        raise Rejected(422, "empty file (0 bytes)")
    kind = kind_of(upload.data[:132], upload.suffix)
    if kind is None:
        raise Rejected(415, f"not an image haven reads: {NOT_SUPPORTED}")
    if kind == "dicom":
        _check_dicom(upload.data, mode, limits)
    else:
        _check_image(upload.data, mode, limits)
    return kind


def deidentified_header(data: bytes):
    """A DICOM's header (no pixel data) de-identified in memory with the anonymize stage's own
    PS3.15 basic profile, and whether pixel data follows it."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    from haven import keys
    from haven.deid.header import Context, clean
    from haven.deid.table import action_table

    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=data[128:132] != b"DICM")
    except Exception as e:
        raise Rejected(422, f"not a readable DICOM header ({type(e).__name__}): a truncated or damaged file?") from None
    at = fp.tell()
    has_pixels = data[at:at + 4] in PIXEL_TAGS
    # dates the table leaves to the default are shifted (as anonymize does) by this process's shift
    clean(ds, Context(_KEY, "ANONYMOUS", keys.day_shift(_KEY, "request"), action_table(False, False, False), {}))
    ds.file_meta = FileMetaDataset()  # the media storage UIDs of the file meta are identifying too
    ds.preamble = None
    return ds, has_pixels


def _check_dicom(data: bytes, mode: str, limits: Limits) -> None:
    ds, has_pixels = deidentified_header(data)
    if not has_pixels:
        raise Rejected(422, "DICOM without pixel data (a report, a presentation state or a truncated file?): "
                            "send an image")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    # HU windows mean something only on CT; gray/rgb models record no training modality (any is read)
    if mode == "ct" and modality != "CT":
        raise Rejected(422, f"the model reads CT Hounsfield units (trained on CT), this file's Modality is "
                            f"{modality or 'missing'}: send a CT image")
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise Rejected(422, "DICOM with an unreadable image description (Rows, Columns, NumberOfFrames)") from None
    if rows < 1 or cols < 1:
        raise Rejected(422, "DICOM pixel data without Rows or Columns")
    _check_size(rows, cols, frames, limits)


def _check_image(data: bytes, mode: str, limits: Limits) -> None:
    from PIL import Image

    if mode == "ct":
        raise Rejected(422, "the model reads CT Hounsfield units (trained on CT DICOM): a PNG/JPEG image has none, "
                            "send the DICOM file")
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only: no pixel is decoded here
            cols, rows = im.size
    except Exception as e:
        raise Rejected(422, f"not a readable image ({type(e).__name__}): a truncated or damaged file?") from None
    _check_size(rows, cols, 1, limits)


def _check_size(rows: int, cols: int, frames: int, limits: Limits) -> None:
    if rows * cols > limits.pixels:
        raise Rejected(413, f"image of {rows} x {cols} pixels, more than the limit of {limits.pixels} pixels")
    if frames > limits.frames:
        raise Rejected(413, f"{frames} frames, more than the limit of {limits.frames}")
