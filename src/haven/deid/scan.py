"""The audit's scanners: every place an identifier could survive in an output, read back.

Every DICOM element (file meta, preamble, every nested sequence item, private elements, and the
burned-in text of pixels that may carry it, by OCR), image metadata blocks (EXIF, XMP, comments,
PNG text chunks, TIFF text tags), every path component of a file and every cell of a CSV table.
A finding names the file, the place (``RequestAttributesSequence[0].PatientName``, ``(0009,1010)``,
``file name``, ``manifest.csv:label``, ``JPEG APP1 segment``) and the kind of identifier; the
texts it was made from travel with it as ``values`` only as far as the audit (its accept list
checks their keyed hashes, ``haven audit --review`` shows them) and never into its result.

A plain DICOM file (one :mod:`haven.deid.rawread` parses) is walked from its bytes
(:mod:`haven.deid.rawscan`: the places and texts of the pydicom walk, :func:`_walk_dicom`, without
building pydicom's elements); any other, and any whose pixel text must be read, through pydicom.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from haven.config import section_defaults
from haven.deid import redact
from haven.deid.identifiers import MAX_BINARY, Identifiers, name_of, strings
from haven.deid.profile import STANDARD_SCHEMES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")  # a segmentation project's masks
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage: 1-bit masks, never burned-in text
_NIFTI_TEXT = ("descrip", "aux_file", "intent_name", "db_name")
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# elements kept verbatim by design (device type for the site/scanner subgroups): not searched
UNSEARCHED_ELEMENTS = frozenset({"Manufacturer", "ManufacturerModelName"})
CODE_ELEMENTS = frozenset({"CodeValue", "CodeMeaning", "CodingSchemeDesignator", "CodingSchemeVersion",
                           "LongCodeValue", "URNCodeValue"})
INTEGER_COLUMNS = frozenset({"input_index", "actions"})
_ALLOWED_JPEG_APP = ((0xE0, b"JFIF\x00"), (0xE2, b"ICC_PROFILE\x00"), (0xEE, b"Adobe"))
_PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}
_TIFF_TEXT_TAGS = {269: "DocumentName", 270: "ImageDescription", 271: "Make", 272: "Model",
                   285: "PageName", 305: "Software", 306: "DateTime", 315: "Artist",
                   316: "HostComputer", 700: "XMP", 33432: "Copyright", 33723: "IPTC",
                   34377: "Photoshop", 34665: "ExifIFD", 34853: "GPSIFD", 37510: "UserComment"}
SNAKEMAKE_MARKER = ".snakemake_timestamp"


def _walk_dicom(ds, prefix: str = "") -> Iterator[tuple[str, str | None, str, bool]]:
    """(where, VR, text, public element) of every element value, recursively; sequences by item.  Left out:
    pixel data, the device type (:data:`UNSEARCHED_ELEMENTS`) and the code value/meaning of
    items coded in a standard scheme (fixed vocabulary)."""
    try:
        standard_code = str(ds.get("CodingSchemeDesignator", "") or "").strip() in STANDARD_SCHEMES
    except Exception:
        standard_code = False
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
        except Exception:  # a value that does not convert: look at its raw bytes
            raw = ds.get_item(tag)
            value = getattr(raw, "value", None)
            if isinstance(value, (bytes, bytearray)) and len(value) <= MAX_BINARY:
                yield prefix + name_of(raw.tag, ""), "UN", bytes(value).decode("latin-1"), False
            continue
        where = prefix + name_of(elem.tag, elem.keyword)
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                yield from _walk_dicom(item, f"{where}[{i}].")
            continue
        if int(elem.tag) in PIXEL_TAGS or elem.keyword in UNSEARCHED_ELEMENTS or (
                standard_code and elem.keyword in CODE_ELEMENTS):
            continue
        values = strings(elem.value)
        if not values:
            continue
        yield where, elem.VR, "\\".join(values), not (elem.tag.group & 1)


_SLASH_DATE = re.compile(r"\b(\d{1,2})[/.\-](\d{1,2})[/.\-](\d{4})\b")
_ISO_DATE = re.compile(r"\b(\d{4})[/.\-](\d{1,2})[/.\-](\d{1,2})\b")


def pixel_text_variants(text: str) -> str:
    """OCR text with its dates also written as DICOM dates (``03/02/2017`` -> ``20170302`` and
    ``20170203``) and person-name punctuation (``DOE,JOHN``) as spaces, for matching."""
    extra = []
    for a, b, year in _SLASH_DATE.findall(text):
        extra += [f"{year}{int(a):02d}{int(b):02d}", f"{year}{int(b):02d}{int(a):02d}"]
    for year, m, d in _ISO_DATE.findall(text):
        extra.append(f"{year}{int(m):02d}{int(d):02d}")
    return "\n".join([text, text.replace(",", " ").replace("^", " "), *extra])


class PixelText:
    """Reads the burned-in text of DICOM files that may carry it (OCR), for the audit."""

    def __init__(self, modalities: Iterable[str] | None = None, enabled: bool = True):
        self.modalities = {m.upper() for m in (modalities if modalities is not None
                                                 else section_defaults("anonymize", "pixels")["modalities"])}
        self.wanted = enabled
        self.read = 0
        self.not_read = 0

    @functools.cached_property
    def enabled(self) -> bool:
        """Whether OCR is on and an engine is installed (asked when a file first needs it: finding
        the engine imports pandas, which is most of a small audit's time)."""
        return self.wanted and redact.ocr_available()

    def applies(self, ds) -> bool:
        if str(ds.get("SOPClassUID", "") or "").strip() == SEG_SOP_CLASS:
            return False  # a segmentation's pixels are labels drawn by a reader or a model
        return redact.may_carry_text(ds, self.modalities)

    def text(self, ds) -> str | None:
        """The pixel text (None: not read: no OCR engine, or undecodable pixels)."""
        if not self.enabled:
            self.not_read += 1
            return None
        try:
            arr = ds.pixel_array
        except Exception:
            self.not_read += 1
            return None
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        frames = redact.frames_of(arr, ds)
        sampled = redact.sample_frames(len(frames), section_defaults("anonymize", "pixels")["frames"])
        texts = [redact.read_lines(redact.ocr_gray(frames[f], photometric)) for f in sampled]
        self.read += 1
        return pixel_text_variants("\n".join(texts))


def _scan_dicom(path: Path, ids: Identifiers, patient: str | None,
                pixels: PixelText | None = None) -> Iterator[tuple[str, str]]:
    """(where, kind, text) of every identifier in a DICOM file: from its byte-level parse
    (:mod:`haven.deid.rawscan`) when it is a plain one and has no pixel text to read, else through
    pydicom (the same places and texts either way)."""
    hits = _scan_parsed(path, ids, patient, pixels)
    if hits is not None:
        yield from hits
        return
    yield from _scan_pydicom(path, ids, patient, pixels)


def _scan_parsed(path: Path, ids: Identifiers, patient: str | None, pixels: PixelText | None) -> list | None:
    """The hits of :func:`_scan_dicom` from the byte-level parse; None: read the file with pydicom."""
    import warnings

    from haven.deid import rawread, rawscan

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = rawread.parse(path.read_bytes())
            if pixels is not None and _may_carry_text(parsed, pixels.modalities):
                return None  # the pixel text is read from pydicom's data set
            hits = []
            if parsed.preamble.strip(b"\x00"):
                text = parsed.preamble.decode("latin-1")
                hits += [("preamble", kind, text) for kind in ids.match(text, "UN", patient)]
            for where, vr, text, public in rawscan.walk(parsed):
                hits += [(where, kind, text) for kind in ids.match(text, vr, patient, public)]
            return hits
    except Exception:  # Unusual, or anything unforeseen: pydicom's read decides
        return None


def _may_carry_text(parsed, modalities) -> bool:
    """:func:`haven.deid.redact.may_carry_text` of the parsed top level."""
    top = {e[0]: e for e in parsed.body}
    if 0x7FE00010 not in top:
        return False

    def value(tag: int) -> str:
        e = top.get(tag)
        if e is None or not isinstance(e[3], bytes):
            return ""
        return e[3].decode("latin-1").rstrip(" \x00").strip().upper()

    if value(0x00080016) == SEG_SOP_CLASS:
        return False  # as PixelText.applies
    return value(0x00280301) == "YES" or value(0x00080060) in modalities


def _scan_pydicom(path: Path, ids: Identifiers, patient: str | None,
                  pixels: PixelText | None = None) -> Iterator[tuple[str, str]]:
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        if pixels is not None and pixels.applies(ds):
            text = pixels.text(ds)
            for kind in ids.match(text or "", "LT", patient):
                yield "(7FE0,0010) burned-in text", kind, text
    preamble = getattr(ds, "preamble", None)
    if preamble and preamble.strip(b"\x00"):
        text = preamble.decode("latin-1")
        for kind in ids.match(text, "UN", patient):
            yield "preamble", kind, text
    meta = getattr(ds, "file_meta", None)
    sources = ([meta] if meta is not None else []) + [ds]
    for d in sources:
        for where, vr, text, public in _walk_dicom(d):
            for kind in ids.match(text, vr, patient, public):
                yield where, kind, text


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, payload) of every marker segment of a JPEG; (-1, trailer) for data after EOI."""
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            return
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            return
        marker = data[i]
        i += 1
        if marker == 0xD9:
            if data[i:].strip(b"\x00"):
                yield -1, data[i:]
            return
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:
            continue
        length = int.from_bytes(data[i:i + 2], "big")
        yield marker, data[i + 2:i + length]
        i += length
        if marker == 0xDA:
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    i = j + (1 if nxt == 0xFF else 2)
                    continue
                i = j
                break


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    i = 8
    while i + 8 <= len(data):
        length = int.from_bytes(data[i:i + 4], "big")
        ctype = data[i + 4:i + 8]
        yield ctype, data[i + 8:i + 8 + length]
        i += 12 + length


def _png_text(ctype: bytes, payload: bytes) -> str:
    try:
        if ctype == b"zTXt":
            keyword, _, rest = payload.partition(b"\x00")
            return (keyword + b" " + zlib.decompress(rest[1:])).decode("latin-1")
        if ctype == b"iTXt":
            parts = payload.split(b"\x00", 5)
            if len(parts) == 6:
                text = parts[5]
                if parts[1][:1] == b"\x01":
                    text = zlib.decompress(text)
                return (parts[0] + b" " + parts[3] + b" " + parts[4] + b" " + text).decode("utf-8", "replace")
    except Exception:
        pass
    return payload.decode("latin-1")


def _scan_image(path: Path, ids: Identifiers, patient: str | None) -> Iterator[tuple[str, str]]:
    data = path.read_bytes()
    if data[:2] == b"\xff\xd8":
        for marker, payload in _jpeg_segments(data):
            if marker == -1:
                where = "JPEG data after EOI"
            elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
                if any(marker == m and payload.startswith(p) for m, p in _ALLOWED_JPEG_APP):
                    continue
                where = "JPEG COM segment" if marker == 0xFE else f"JPEG APP{marker - 0xE0} segment"
            else:
                continue
            text = payload.decode("latin-1")
            yield where, "metadata", text
            for kind in ids.match(text, "UN", patient):
                yield where, kind, text
        return
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        for ctype, payload in _png_chunks(data):
            if ctype in _PNG_TEXT_CHUNKS:
                where = f"PNG {ctype.decode('latin-1')} chunk"
                text = _png_text(ctype, payload)
                yield where, "metadata", text
                for kind in ids.match(text, "UN", patient):
                    yield where, kind, text
        return
    from PIL import Image

    with Image.open(path) as im:
        tags = getattr(im, "tag_v2", None)
        if tags is not None:
            for number, name in _TIFF_TEXT_TAGS.items():
                if number in tags:
                    where = f"TIFF {name} tag"
                    text = str(tags[number])
                    yield where, "metadata", text
                    for kind in ids.match(text, "UN", patient):
                        yield where, kind, text
        for k in im.info:
            if k in ("comment", "exif", "xmp", "XML:com.adobe.xmp", "photoshop", "iptc"):
                yield f"image info {k}", "metadata", None  # not read: cannot be accepted


def _scan_nifti(path: Path, ids: Identifiers, patient: str | None) -> Iterator[tuple[str, str]]:
    """A NIfTI volume's or mask's header text fields and extensions: anonymize leaves none but its
    own mark in ``descrip`` (:data:`haven.deid.volumes.MARKS`), so any other is a finding."""
    import nibabel as nib

    from haven.deid.volumes import MARKS

    img = nib.load(str(path))
    header = img.header
    for field in _NIFTI_TEXT:
        raw = header[field] if field in header else b""
        text = (raw.item() if hasattr(raw, "item") else raw).rstrip(b"\x00 ").decode("latin-1")
        if field == "descrip" and text in MARKS:
            continue
        if text.strip():
            yield f"NIfTI {field}", "metadata", text
            for kind in ids.match(text, "UN", patient):
                yield f"NIfTI {field}", kind, text
    for i, ext in enumerate(header.extensions):
        content = getattr(ext, "content", None)  # the raw bytes (nibabel >= 5.2)
        text = bytes(content if isinstance(content, (bytes, bytearray)) else b"").decode("latin-1")
        yield f"NIfTI extension {i}", "metadata", text or None
        for kind in ids.match(text, "UN", patient):
            yield f"NIfTI extension {i}", kind, text


def _scan_json(path: Path, ids: Identifiers, patient: str | None) -> Iterator[tuple[str, str]]:
    """A volume's JSON sidecar: every key must be one anonymize keeps or shifts
    (:func:`haven.deid.sidecar.action`), and no value may hold an identifier (an ISO date is also
    compared in the ``YYYYMMDD`` form the dates were recorded in)."""
    import json

    from haven.deid import sidecar

    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        yield "JSON", "metadata", None
        return
    for k, value in meta.items():
        where = f"JSON {k}"
        if sidecar.action(k) not in ("keep", "shift"):
            yield where, "metadata", None  # a key anonymize removes: never accepted
        texts = value if isinstance(value, list) else [value]
        for text in (str(t) for t in texts if isinstance(t, (str, int, float))):
            date = sidecar.compact_date(text)
            for probe, vr in ((text, "UN"), (date, "DA")):
                if probe:
                    for kind in ids.match(probe, vr, patient):
                        yield where, kind, text


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def scan_file(path: Path, rel: str, ids: Identifiers, patient: str | None,
               pixels: PixelText | None = None) -> list[dict]:
    findings: list[dict] = []
    seen: dict[tuple[str, str], dict] = {}
    # a finding must not carry the value: path components that match are redacted
    parts = list(Path(rel).parts)
    shown = [("[redacted]" if ids.match(p, None, patient) or ids.match(Path(p).stem, None, patient)
              else p) for p in parts]
    if ids.match(rel, None, patient) or ids.match(str(Path(rel).with_suffix("")), None, patient):
        shown = ["[redacted]" for _ in parts] if shown == parts else shown
    label = "/".join(shown)

    def add(where: str, kind: str, value: str | None) -> None:
        # one finding per place and kind; ``values``: every text that made it (the audit's accept
        # list must clear each; None: no value, never accepted), dropped before the result is written
        if (where, kind) not in seen:
            seen[(where, kind)] = {"file": label, "where": where, "kind": kind, "values": []}
            findings.append(seen[(where, kind)])
        if value not in seen[(where, kind)]["values"]:
            seen[(where, kind)]["values"].append(value)

    names = {rel, str(Path(rel).with_suffix(""))}
    for part in parts:
        names |= {part, Path(part).stem}
    for name in names:
        for kind in ids.match(name, None, patient):
            add("file name", kind, name)
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            hits = _scan_image(path, ids, patient)
        elif path.name.lower().endswith(NIFTI_SUFFIXES):
            hits = _scan_nifti(path, ids, patient)
        elif path.suffix.lower() == ".json":
            hits = _scan_json(path, ids, patient)
        elif _is_dicom_file(path):
            hits = _scan_dicom(path, ids, patient, pixels)
        else:
            hits = iter([("file", "unknown file type", None)])
        for where, kind, value in hits:
            add(where, kind, value)
    except Exception as e:  # a file the audit cannot read cannot be proven clean
        add("file", f"unreadable ({type(e).__name__})", None)
    return findings


def scan_tree(root: Path, ids: Identifiers, patient_of: dict[str, str] | None = None,
               pixels: PixelText | None = None, base: Path | None = None, progress=None) -> tuple[int, list]:
    """(files, findings) of every file under ``root``, each named by its path relative to ``base``
    (default ``root``): the name the manifest and the log give it, which links it to its patient.
    ``progress``: a :class:`haven.progress.Progress` told of each file scanned (a count only)."""
    base = root if base is None else base
    files = 0
    findings: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(base).as_posix()
            if name == SNAKEMAKE_MARKER and path.stat().st_size == 0:
                continue  # Snakemake's empty marker in a directory() output (one per shard folder)
            files += 1
            patient = patient_of.get(rel) if patient_of else None
            found = scan_file(path, rel, ids, patient, pixels)
            findings.extend(found)
            if progress is not None:
                progress.update(with_findings=1 if found else 0)
    return files, findings


def scan_csv(path: Path, ids: Identifiers) -> list[dict]:
    findings: list[dict] = []
    if not path.is_file():
        return findings
    seen: dict[tuple[str, str], dict] = {}

    def add(where: str, kind: str, value: str) -> None:  # as scan_file's: one per place and kind
        if (where, kind) not in seen:
            seen[(where, kind)] = {"file": path.name, "where": where, "kind": kind, "values": []}
            findings.append(seen[(where, kind)])
        if value not in seen[(where, kind)]["values"]:
            seen[(where, kind)]["values"].append(value)

    # surrogateescape: a stray byte that is not UTF-8 is scanned, not a crash (haven.io.TEXT)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        for h in header:
            for kind in ids.match(h):
                add(f"{path.name}:header", kind, h)
        for row in reader:
            for column, cell in zip(header, row):
                if column in INTEGER_COLUMNS and cell.isdigit():
                    continue  # counters written by anonymize (row index, number of actions)
                for kind in ids.match(cell):
                    add(f"{path.name}:{column}", kind, cell)
    return findings
