"""Ingest: walk a source folder into a manifest; quarantine every file that cannot be used.

Writes three files into ``out_dir`` (the PHI zone, see docs/architecture.md):

* ``manifest.csv`` - one row per accepted file: ``path,kind,patient_id,study_uid,series_uid,
  sop_uid,accession,modality,label,sex,age,site,rows,cols``;
* ``identifiers.csv`` - ``patient_id,tag,value``: every identifying value seen in the accepted
  DICOM headers (recursively through sequences and private tags), for the audit;
* ``quarantine.csv`` - ``path,reason`` for every file that was not accepted.

A file is accepted when it is a DICOM file with pixel data that decodes, or a PNG/JPEG/TIFF/BMP
image that PIL can verify and load, and it has a label.  A bad file never stops the run: its
reason (exception class and message, never a header value) goes to the quarantine list.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import re
import warnings
from pathlib import Path, PurePosixPath

from haven.deid.profile import FREE_TEXT_KEYWORDS, IDENTIFYING_KEYWORDS
from haven.io import atomic_write_text, csv_text

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "kind", "patient_id", "study_uid", "series_uid", "sop_uid", "accession",
                    "modality", "label", "sex", "age", "site", "rows", "cols"]
IDENTIFIER_COLUMNS = ["patient_id", "tag", "value"]
QUARANTINE_COLUMNS = ["path", "reason"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
LABEL_KEYS = ("accession", "patient_id", "path")
NOT_SUPPORTED = "not DICOM or a supported image (png, jpg, jpeg, tif, tiff, bmp)"

STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
              "UI", "UR", "UT"}
TEXT_VRS = {"LT", "ST", "UT", "UC"}
STANDARD_UID_ROOT = "1.2.840.10008."
MIN_VALUE_CHARS = 3
MAX_VALUE_CHARS = 1024  # a prefix is enough for the audit's substring search
_DECIMAL = re.compile(r"^[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?$")


class _Quarantine(Exception):
    """A file that cannot be accepted; the message is the (PHI-free) reason."""


# ---------------------------------------------------------------------------------------------
# labels


def _load_labels(labels: Path, label_key: str | None, label_column: str) -> tuple[dict, dict, str]:
    """Read the label table: ({key: label}, {key: patient}, key field).  Raises ValueError."""
    import pandas as pd

    labels = Path(labels)
    if not labels.is_file():
        raise ValueError(f"labels file {labels} not found: fix `labels` in the config or create the file")
    try:
        table = pd.read_csv(labels, dtype=str, keep_default_na=False, skipinitialspace=True,
                            encoding="utf-8-sig")  # utf-8-sig: spreadsheets often add a BOM
    except Exception as e:
        raise ValueError(f"labels file {labels} cannot be read as CSV ({type(e).__name__}: {e})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if label_key is None:
        first = table.columns[0] if len(table.columns) else ""
        if first not in LABEL_KEYS:
            raise ValueError(
                f"labels file {labels}: no `label_key` given and its first column {first!r} is not "
                f"one of {', '.join(LABEL_KEYS)}: set `label_key` in the config"
            )
        label_key = first
    if label_key not in LABEL_KEYS:
        raise ValueError(
            f"label_key {label_key!r} for {labels} is not a manifest field it can be keyed by: "
            f"use one of {', '.join(LABEL_KEYS)}"
        )
    for col, what in ((label_key, "label_key"), (label_column, "label_column")):
        if col not in table.columns:
            raise ValueError(
                f"labels file {labels} has no column {col!r} (it has: {', '.join(table.columns) or 'none'}): "
                f"add the column or set `{what}` in the config to the right column name"
            )
    keys = table[label_key].astype(str).str.strip()
    if label_key == "path":
        keys = keys.map(_norm_rel)
    values = table[label_column].astype(str).str.strip()
    patients = table["patient"].astype(str).str.strip() if "patient" in table.columns else None
    out: dict[str, str] = {}
    pat: dict[str, str] = {}
    first_row: dict[str, int] = {}
    for i, (k, v) in enumerate(zip(keys, values)):
        if not k or not v:
            continue
        if k in out and out[k] != v:
            raise ValueError(
                f"labels file {labels}: rows {first_row[k] + 2} and {i + 2} give the same "
                f"{label_key} different labels: keep one row per {label_key}"
            )
        out[k] = v
        first_row.setdefault(k, i)
        if patients is not None and patients.iloc[i]:
            pat[k] = patients.iloc[i]
    return out, pat, label_key


def _norm_rel(p: str) -> str:
    p = p.replace("\\", "/").strip()
    while p.startswith("./"):
        p = p[2:]
    return str(PurePosixPath(p)) if p else ""


# ---------------------------------------------------------------------------------------------
# reading one file


def _reason(e: BaseException, path: Path) -> str:
    """Exception class + message, without the file's absolute path, on one short line."""
    msg = str(e)
    for s in {str(path), repr(str(path)), str(path.resolve())}:
        msg = msg.replace(s, "<file>")
    msg = " ".join(msg.split())
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


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
        raise _Quarantine(NOT_SUPPORTED)
    if "TransferSyntaxUID" not in ds.file_meta:
        # no file meta (bare dataset): the reader detected the encoding; name it so pixels decode
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is not None:
            ds.file_meta.TransferSyntaxUID = (
                uid.ImplicitVRLittleEndian if implicit
                else uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
            )
    if len(ds) == 0:
        raise _Quarantine("DICOM file with no data elements after the header (truncated or empty)")
    if "PixelData" not in ds:
        raise _Quarantine("no pixel data")
    for kw in ("Rows", "Columns"):
        if not _uint(ds, kw):
            raise _Quarantine(f"pixel data without {kw}")
    if check_pixels:
        _check_pixels(ds, path)
    return ds


@functools.lru_cache(maxsize=64)
def _is_native(transfer_syntax: str) -> bool:
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    return bool(transfer_syntax) and ts.is_transfer_syntax and not ts.is_compressed


def _check_pixels(ds, path: Path) -> None:
    """Quarantine pixel data that preprocess could not decode.  Compressed (encapsulated) data is
    decoded once; native data needs no decoder, so checking that it holds every byte the image
    description asks for is the same test without the cost of building the array."""
    ts = ds.file_meta.get("TransferSyntaxUID", "") or ""
    native = _is_native(str(ts)) and 0x7FE00008 not in ds._dict and 0x7FE00009 not in ds._dict
    if native:
        try:
            rows, cols, bits = _uint(ds, "Rows") or 0, _uint(ds, "Columns") or 0, _uint(ds, "BitsAllocated") or 0
            samples = _uint(ds, "SamplesPerPixel") or 1
            frames = int(_text(ds, "NumberOfFrames") or 1)
            photometric = _text(ds, "PhotometricInterpretation")
        except Exception as e:
            raise _Quarantine(f"pixel data without a usable image description: {_reason(e, path)}") from None
        if bits not in (1, 8, 16, 32, 64) or rows < 1 or cols < 1 or samples < 1 or frames < 1:
            raise _Quarantine("pixel data with an impossible image description")
        expected = (rows * cols * samples * frames * bits + 7) // 8
        if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
            expected = expected * 2 // 3
        pixels = ds.get_item(0x7FE00010).value  # raw bytes, not converted
        if pixels is None or len(pixels) < expected:
            raise _Quarantine(f"pixel data cannot be decoded: {len(pixels or b'')} bytes for an image of "
                              f"{expected} bytes (truncated?)")
        return
    try:
        ds.pixel_array  # noqa: B018 - decode once so that unreadable pixels are caught here
    except Exception as e:
        raise _Quarantine(f"pixel data cannot be decoded: {_reason(e, path)}") from None


def _read_image(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:  # verify() leaves the image unusable: reopen and decode fully
        im.load()
        cols, rows = im.size
    return rows, cols


# ---------------------------------------------------------------------------------------------
# header fields


# Raw values are decoded here directly when the character set is a single-byte Latin one or UTF-8
# (what nearly every file declares): the same strings pydicom would give, without building its
# value objects; any other case goes through pydicom.
_FAST_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})


def _codec(ds) -> str | None:
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


def _text(ds, kw: str, codec: str | None = "latin-1") -> str:
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


def _uint(ds, kw: str) -> int | None:
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


def _age_years(ds, codec: str | None = "latin-1") -> str:
    m = _AGE.match(_text(ds, "PatientAge", codec))
    if m:
        n, unit = int(m.group(1)), (m.group(2) or "Y").upper()
        years = {"Y": n, "M": n / 12, "W": n * 7 / 365.25, "D": n / 365.25}[unit]
        return _fmt_num(years)
    birth = _date(_text(ds, "PatientBirthDate", codec))
    if birth is None:
        return ""
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        when = _date(_text(ds, kw, codec))
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


def _walk(ds, prefix: str = "", codec: str | None = "latin-1"):
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
            if vr != "SQ" and not tag.group & 1 and entry is not None:
                fast = _raw_strings(ds, t, vr, codec)
            if fast is not None:
                name, values = prefix + entry[4], fast
                is_uid = vr == "UI"
                private = False
            else:
                elem = ds[tag]  # converting a raw element may fail on a malformed value
                name = prefix + _tag_name(elem)
                if elem.VR == "SQ":
                    for i, item in enumerate(elem.value or []):
                        yield from _walk(item, f"{name}[{i}].", codec)
                    continue
                if not _identifying(elem):
                    continue
                values, is_uid, private = _strings(elem), elem.VR == "UI", elem.tag.is_private
            for value in values:
                value = value.strip().strip("\x00").strip()
                if len(value) < MIN_VALUE_CHARS:
                    continue
                if is_uid and value.startswith(STANDARD_UID_ROOT):
                    continue
                if private and _DECIMAL.match(value):
                    continue  # vendor measurements (1.016600): numbers, not identifiers
                yield name, value[:MAX_VALUE_CHARS]
        except Exception:  # an unparsable element: skip it, keep walking
            continue


# ---------------------------------------------------------------------------------------------
# the stage


def _iter_files(source: Path, skip: Path | None, keep=None):
    """(path, relative posix path, symlink problem or None), sorted, hidden names skipped; with
    ``keep(rel)`` only those paths (a shard's files: the others are not even stat'ed)."""
    root = source.resolve()
    found = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as it:
            entries = list(it)
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = prefix + e.name
            if e.is_dir(follow_symlinks=False):
                if skip is not None and Path(e.path).resolve() == skip:
                    continue
                walk(e.path, rel + "/")
                continue
            if keep is not None and not keep(rel):
                continue
            problem = None
            if e.is_symlink():
                try:
                    target = Path(e.path).resolve(strict=True)
                except (OSError, RuntimeError):
                    problem = "broken symbolic link"
                else:
                    if target.is_dir():
                        problem = "symbolic link to a folder: not followed"
                    elif not target.is_relative_to(root):
                        problem = "symbolic link to a file outside the source: not followed"
                    elif not target.is_file():
                        problem = "symbolic link to something that is not a file"
            elif not e.is_file(follow_symlinks=False):
                problem = "not a regular file"
            found.append((Path(e.path), rel, problem))

    walk(str(source), "")
    found.sort(key=lambda r: r[1])
    return found


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


def ingest(source: Path, out_dir: Path, labels: Path | None = None, label_key: str | None = None,
           label_column: str = "label", *, check_pixels: bool = True, shard: tuple[int, int] = (0, 1)) -> dict:
    """Walk ``source`` into ``out_dir/{manifest,identifiers,quarantine}.csv``.

    Labels: without a label table every file's label is the name of its parent folder (the
    class subfolder); files directly in ``source`` are quarantined.  With ``labels`` (a CSV),
    ``label_key`` names the manifest field it is keyed by (``accession``, ``patient_id`` or
    ``path``; by default the table's first column if it is one of these) and ``label_column``
    the label; a file without a label row is quarantined.  An optional ``patient`` column
    gives images their patient id.  ``check_pixels`` decodes every DICOM's pixel data once so
    that undecodable files are quarantined here rather than later.  ``shard=(i, n)`` reads only
    the files of shard i of n (:func:`haven.shards.shard_of`); the shards' outputs are merged by
    :func:`haven.shards.merge_ingest`.

    Returns ``{"files", "accepted", "quarantined", "patients"}``.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise ValueError(f"source {source} is not a folder: fix `source` in the config")
    table = pat_table = None
    key_field = None
    labels_name = ""
    if labels is not None:
        table, pat_table, key_field = _load_labels(Path(labels), label_key, label_column)
        labels_name = Path(labels).name
    skip = out_dir.resolve() if out_dir.resolve().is_relative_to(source.resolve()) else None

    manifest: list[dict] = []
    quarantine: list[dict] = []
    identifiers: list[dict] = []
    seen_ids: set[tuple[str, str, str]] = set()
    seen_sops: dict[str, str] = {}

    from haven.shards import shard_of

    index, shards = shard
    keep = (lambda rel: shard_of(rel, shards) == index) if shards > 1 else None
    with _quiet_pydicom():
        for path, rel, problem in _iter_files(source, skip, keep):
            try:
                if problem:
                    raise _Quarantine(problem)
                row, ids = _one(path, rel, check_pixels)
                # label
                if table is None:
                    parent = PurePosixPath(rel).parent
                    if str(parent) in ("", "."):
                        raise _Quarantine(
                            "no label: the file is not in a class folder and no labels table was given"
                        )
                    row["label"] = parent.name
                else:
                    key = row[key_field] if key_field != "path" else _norm_rel(rel)
                    if not key:
                        raise _Quarantine(f"no {key_field} in the file to look up its label in {labels_name}")
                    if key not in table:
                        raise _Quarantine(f"no label for this file in {labels_name}")
                    row["label"] = table[key]
                    if row["kind"] == "image" and key in pat_table:
                        row["patient_id"] = pat_table[key]
                        ids.append(("labels:patient", pat_table[key]))
                sop = row["sop_uid"]
                if sop and sop in seen_sops:
                    # the same instance twice (a copy, a link): downstream names derive from its UID
                    raise _Quarantine(f"duplicate: same SOPInstanceUID as {seen_sops[sop]}")
                if sop:
                    seen_sops[sop] = rel
            except _Quarantine as q:
                quarantine.append({"path": rel, "reason": str(q)})
                continue
            except Exception as e:  # never crash on one file
                quarantine.append({"path": rel, "reason": _reason(e, path)})
                continue
            manifest.append(row)
            pid = row["patient_id"]
            for tag, value in ids:
                if (pid, tag, value) not in seen_ids:
                    seen_ids.add((pid, tag, value))
                    identifiers.append({"patient_id": pid, "tag": tag, "value": value})

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "manifest.csv", csv_text(MANIFEST_COLUMNS, manifest))
    atomic_write_text(out_dir / "identifiers.csv", csv_text(IDENTIFIER_COLUMNS, identifiers))
    atomic_write_text(out_dir / "quarantine.csv", csv_text(QUARANTINE_COLUMNS, quarantine))

    summary = {
        "files": len(manifest) + len(quarantine),
        "accepted": len(manifest),
        "quarantined": len(quarantine),
        "patients": len({r["patient_id"] for r in manifest}),
    }
    log.info("ingest %s: %d files, %d accepted, %d quarantined, %d patients", source,
             summary["files"], summary["accepted"], summary["quarantined"], summary["patients"])
    return summary


def _one(path: Path, rel: str, check_pixels: bool) -> tuple[dict, list[tuple[str, str]]]:
    """Read one file: (manifest row without label, identifiers) or raise."""
    with open(path, "rb") as fh:
        head = fh.read(132)
        if not head:
            raise _Quarantine("empty file (0 bytes)")
        has_preamble = len(head) == 132 and head[128:132] == b"DICM"
        suffix = path.suffix.lower()
        dicom = has_preamble or (suffix not in IMAGE_SUFFIXES and _looks_like_bare_dicom(head))
        if dicom:  # read from the open file: one open per file
            fh.seek(0)
            ds = _read_dicom(fh, has_preamble, check_pixels, path)
    if dicom:
        codec = _codec(ds)

        def text(kw):
            return _text(ds, kw, codec)

        row = {
            "path": rel,
            "kind": "dicom",
            "patient_id": text("PatientID") or text("StudyInstanceUID") or str(PurePosixPath(rel).with_suffix("")),
            "study_uid": text("StudyInstanceUID"),
            "series_uid": text("SeriesInstanceUID"),
            "sop_uid": text("SOPInstanceUID"),
            "accession": text("AccessionNumber"),
            "modality": text("Modality"),
            "label": "",
            "sex": text("PatientSex").upper(),
            "age": _age_years(ds, codec),
            "site": text("InstitutionName"),
            "rows": _uint(ds, "Rows"),
            "cols": _uint(ds, "Columns"),
        }
        return row, list(_walk(ds, codec=codec))
    if suffix in IMAGE_SUFFIXES:
        rows, cols = _read_image(path)
        row = {k: "" for k in MANIFEST_COLUMNS}
        row.update(path=rel, kind="image", patient_id=str(PurePosixPath(rel).with_suffix("")),
                   rows=rows, cols=cols)
        return row, []
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!", b"BZh")) or suffix in (
            ".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar"):
        # never unpacked here: members would be PHI written outside the output and quarantine
        raise _Quarantine("an archive (zip/gzip/7z/rar/tar): unpack it into the source folder to use "
                          "its files")
    for magic, kind, ext in _IMAGE_MAGIC:
        if head.startswith(magic):
            raise _Quarantine(f"a {kind} image with a {suffix or 'missing'} extension: rename it to {ext} to use it")
    raise _Quarantine(NOT_SUPPORTED)


_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG", ".png"), (b"\xff\xd8\xff", "JPEG", ".jpg"),
                (b"II*\x00", "TIFF", ".tif"), (b"MM\x00*", "TIFF", ".tif"), (b"BM", "BMP", ".bmp"))
