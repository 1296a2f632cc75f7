"""Audit: prove that no original identifier survived anonymization (the safe-haven gate).

:func:`audit` re-reads everything the anonymize stage wrote - every DICOM element (file meta,
preamble, every nested sequence item, private elements), image metadata blocks (EXIF, XMP,
comments, PNG text chunks, TIFF text tags), every path component under ``data/`` and every cell
of ``manifest.csv`` and ``anonymization.log.csv`` - and looks for the identifying values that
ingest recorded in ``identifiers.csv`` plus the manifest's ids, UIDs, accession numbers and
sites.  A finding names the file, the place (``RequestAttributesSequence[0].PatientName``,
``(0009,1010)``, ``file name``, ``manifest.csv:label``, ``JPEG APP1 segment``) and the kind of
identifier, never the value itself.

Matching (case-insensitive; one pass per value, never a loop over the identifiers):

* ids, names, UIDs of 6 characters or more: substring, all of them in one compiled alternation
  (all-digit ids inside numeric VRs: whole token only, ``0.000000001`` is chance);
* shorter ones: exact token match (tokens: runs of letters, digits, ``.``, ``_``, ``-``), not in
  numeric VRs (IS, DS, US, ...), where a short id would only match by chance;
* numbers with a decimal point or sign (``0.9236``): exact token match, not in numeric VRs;
* person names also as ``^``-free variants (``DOE^JOHN`` -> ``doe john``, ``doe_john``,
  ``john doe``);
* dates (``YYYYMMDD`` from DA and the date part of DT values): exact token match, and only
  against the dates of the same patient (outputs are linked to their patient through
  ``anonymization.log.csv``); times (TM), ages (AS) and the patient characteristics haven
  retains on purpose are not searched;
* free text (descriptions, comments, LT/ST/UT) of two words or more: the whole text (the names
  inside it are identifiers of their own; single words such as ``Carotids`` are vocabulary), not
  in CS elements (defined terms, PS3.15 E.1.1 note 9);
* private values: the whole value, in private elements, file names, metadata and CSV cells;
* placeholders (``ANONYMIZED``, ``UNKNOWN``, ...) identify nobody and are ignored; the device
  type (Manufacturer, ManufacturerModelName) and code values/meanings of standard coding schemes
  (DCM, SCT, LN, ...) are fixed vocabulary and are not searched.

:func:`audit_tree` runs the same checks over any folder (e.g. the original data, to show that the
audit does find what it looks for).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from haven.deid.profile import CLEAN_DESCRIPTORS, STANDARD_SCHEMES, safe_private_table
from haven.io import atomic_write_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
STANDARD_UID_ROOT = "1.2.840.10008."
MIN_CHARS = 3  # identifiers shorter than this are ignored (a single character matches anything)
LONG_CHARS = 6  # from this length on, identifiers are matched as substrings
MAX_TRIE_CHARS = 400  # longer identifiers (rare) are checked one by one
NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "OF",
                         "OD", "OL", "OV", "OW"})
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
MAX_BINARY = 1 << 16  # binary values larger than this (pixel-like payloads) are not decoded
# identifier kinds that haven keeps on purpose (Retain Patient Characteristics, times of day)
RETAINED_KEYWORDS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight"})
# elements kept verbatim by design (device type for the site/scanner subgroups): not searched
UNSEARCHED_ELEMENTS = frozenset({"Manufacturer", "ManufacturerModelName"})
# values that identify nobody (placeholders left by earlier de-identification, test data)
PLACEHOLDERS = frozenset({"anonymized", "anonymised", "anonymous", "anon", "removed", "deidentified",
                          "de-identified", "unknown", "none", "null", "n/a", "not available", "dummy",
                          "test", "default", "other"})
CODE_ELEMENTS = frozenset({"CodeValue", "CodeMeaning", "CodingSchemeDesignator", "CodingSchemeVersion",
                           "LongCodeValue", "URNCodeValue"})
_FREE_TEXT = re.compile(r"Description|Comment|History|Reason|Protocol|Label|Text|Alerts|Allergies|"
                        r"Occupation|Notes|Narrative|Explanation|DisplayName|Title")
INTEGER_COLUMNS = frozenset({"input_index", "actions"})
MANIFEST_IDENTIFIER_COLUMNS = ("patient_id", "study_uid", "series_uid", "sop_uid", "accession", "site")

_TOKEN = re.compile(r"[\w.\-]+")
_NUMBER = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_TAG_TEXT = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
_ALLOWED_JPEG_APP = ((0xE0, b"JFIF\x00"), (0xE2, b"ICC_PROFILE\x00"), (0xEE, b"Adobe"))
_PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}
_TIFF_TEXT_TAGS = {269: "DocumentName", 270: "ImageDescription", 271: "Make", 272: "Model",
                   285: "PageName", 305: "Software", 306: "DateTime", 315: "Artist",
                   316: "HostComputer", 700: "XMP", 33432: "Copyright", 33723: "IPTC",
                   34377: "Photoshop", 34665: "ExifIFD", 34853: "GPSIFD", 37510: "UserComment"}


# ---------------------------------------------------------------------------------------------
# identifiers


@lru_cache(maxsize=65536)
def _kind_vr(kind: str) -> tuple[str | None, str]:
    """(dictionary VR, keyword) of an identifier kind such as ``Seq[0].StudyDate`` or ``(0008,0020)``."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    last = kind.rsplit(".", 1)[-1]
    last = re.sub(r"\[\d+\]$", "", last).strip()
    m = _TAG_TEXT.fullmatch(last)
    try:
        if m:
            t = int(m.group(1) + m.group(2), 16)
            if (t >> 16) & 1:
                return None, last
            return dictionary_VR(t), last
        t = tag_for_keyword(last)
        return (dictionary_VR(t) if t is not None else None), last
    except KeyError:
        return None, last


def _as_date(text: str) -> str | None:
    s = text.strip()
    if len(s) != 8 or not s.isdigit():
        return None
    try:
        dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return None
    return s


def _shift(date: str, days: int) -> str:
    d = dt.date(int(date[:4]), int(date[4:6]), int(date[6:8])) + dt.timedelta(days=days)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching exactly ``words``, factored as a prefix trie (longest match first)."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alternatives = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alternatives:
            return ""
        body = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


class Identifiers:
    """Every identifying value, compiled for one-pass matching of a text against all of them."""

    def __init__(self, entries: Iterable[tuple[str, str, str]], shifts: dict[str, int] | None = None,
                 retained: Iterable[str] = (), retain_uids: bool = False,
                 safe_private: Iterable[tuple[int, int]] = ()):
        """``entries``: (patient_id, kind, value).  ``shifts``: patient -> day shift (optional;
        with it, a date that is the shifted image of one of the patient's dates is not a leak).
        ``retained``: keywords of free text kept on purpose (Clean Descriptors), not matched as a
        whole value (the names and ids inside them still are); ``retain_uids``: UIDs are kept
        (Retain UIDs option) and not searched; ``safe_private``: (group, element offset) of the
        private elements kept by Retain Safe Private (their values are kept, not leaks)."""
        self.safe_private = frozenset(safe_private)
        self.retained = frozenset(retained)
        self.retain_uids = retain_uids
        self.long: dict[str, set[str]] = {}  # substring
        self.digits: set[str] = set()  # long all-digit ids: tokens only inside numeric VRs
        self.short: dict[str, set[str]] = {}  # exact token
        self.numbers: dict[str, set[str]] = {}  # exact token, not in numeric VRs
        self.exact: dict[str, set[str]] = {}  # free text: whole value, not in CS
        self.private: dict[str, set[str]] = {}  # private values: whole value, not in public elements
        self.dates: dict[str, dict[str, set[str]]] = {}  # date -> patient -> kinds
        self.patient_dates: dict[str, set[str]] = {}
        self.shifts = shifts or {}
        self.count = 0
        self.skipped = 0
        for patient, kind, value in entries:
            self._add(patient or "", kind or "identifier", value)
        # one regex over a prefix trie of all long identifiers: at each position the engine
        # walks the trie (cost ~ identifier length), not the list of identifiers
        self._very_long = [v for v in self.long if len(v) > MAX_TRIE_CHARS]
        trie_words = [v for v in self.long if len(v) <= MAX_TRIE_CHARS]
        self._long_re = re.compile(_trie_pattern(trie_words)) if trie_words else None

    def _add(self, patient: str, kind: str, value: str) -> None:
        value = (value or "").strip().strip("\x00").strip()
        if len(value) < MIN_CHARS or value.casefold() in PLACEHOLDERS or len(set(value)) == 1:
            return
        vr, keyword = _kind_vr(kind)
        lower = keyword.lower()
        if (keyword in self.retained and vr != "PN") or (self.retain_uids and (
                vr == "UI" or keyword in ("study_uid", "series_uid", "sop_uid"))):
            self.skipped += 1  # kept by a profile option
            return
        if vr in ("TM", "AS") or keyword in RETAINED_KEYWORDS or (
                vr is None and lower.endswith("time") and "date" not in lower):
            self.skipped += 1  # retained by design (times of day, patient characteristics)
            return
        self.count += 1
        private = vr is None and keyword.startswith("(")
        if private and self.safe_private:
            m = _TAG_TEXT.fullmatch(keyword)
            if m and (int(m.group(1), 16), int(m.group(2), 16) & 0xFF) in self.safe_private:
                self.count -= 1
                self.skipped += 1  # kept by Retain Safe Private
                return
        dateish = vr in ("DA", "DT") or (vr is None and "date" in lower)
        date = _as_date(value[:8]) if (dateish or vr is None) else None
        if date and (len(value) == 8 or dateish):
            self.dates.setdefault(date, {}).setdefault(patient, set()).add(kind)
            self.patient_dates.setdefault(patient, set()).add(date)
            if len(value) == 8:
                return
        cf = value.casefold()
        if private:
            # a private value of unknown meaning: it must not survive in a private element (all
            # are removed); public copies of identifying values are identifiers of their own
            self.private.setdefault(cf, set()).add(kind)
            return
        if vr in ("LT", "ST", "UT", "UC") or (vr != "PN" and _FREE_TEXT.search(keyword)):
            # free text is searched as a whole value, and only when it reads like a sentence:
            # single words ("Carotids") are vocabulary; the names inside have their own entries
            if len(value) < LONG_CHARS or len(value.split()) < 2:
                self.count -= 1
                self.skipped += 1
                return
            self.exact.setdefault(cf, set()).add(kind)
            return
        variants = {cf}
        if vr == "PN" or (vr is None and "^" in value):  # person name: ^-free variants
            base = cf.split("=")[0]
            parts = [p.strip() for p in base.split("^") if p.strip()]
            variants |= {base.rstrip("^ "), " ".join(parts), "_".join(parts)}
            if len(parts) >= 2:
                variants.add(" ".join(parts[1:] + parts[:1]))  # given names first
        for v in variants:
            if len(v) < MIN_CHARS or v in PLACEHOLDERS:
                continue
            if _NUMBER.fullmatch(v) and not v.isdigit():
                self.numbers.setdefault(v, set()).add(kind)
            elif len(v) >= LONG_CHARS:
                self.long.setdefault(v, set()).add(kind)
                if v.isdigit():
                    self.digits.add(v)
            else:
                self.short.setdefault(v, set()).add(kind)

    def match(self, text: str, vr: str | None = None, patient: str | None = None,
              public: bool = False) -> set[str]:
        """The kinds of every identifier found in ``text`` (empty set: clean).  ``vr``: the VR of
        the element the text comes from; ``public``: it is a public (even group) element."""
        if not text:
            return set()
        cf = text.casefold()
        kinds: set[str] = set()
        whole = cf.strip()
        tokens = set(_TOKEN.findall(cf))
        tokens.add(whole)
        numeric = vr in NUMERIC_VRS
        if self._long_re is not None:
            for m in self._long_re.finditer(cf):
                found = m.group()
                if numeric and found in self.digits and found not in tokens:
                    continue  # an id's digits inside a number (0.000000001) are chance
                kinds |= self.long[found]
        for v in self._very_long:
            if v in cf:
                kinds |= self.long[v]
        if self.short and not numeric:
            for tok in tokens.intersection(self.short):
                kinds |= self.short[tok]
        if self.numbers and not numeric:
            for tok in tokens.intersection(self.numbers):
                kinds |= self.numbers[tok]
        if (self.exact and vr != "CS") or (self.private and not public):
            parts = {whole, *(p.strip() for p in whole.split("\\"))}
            if vr != "CS":
                for part in parts.intersection(self.exact):
                    kinds |= self.exact[part]
            if not public:
                for part in parts.intersection(self.private):
                    kinds |= self.private[part]
        if self.dates:
            candidates = tokens
            if vr == "DT" or vr is None:
                candidates = tokens | {v.strip()[:8] for v in cf.split("\\")}
            for date in candidates.intersection(self.dates):
                kinds |= self._date_kinds(date, patient)
        return kinds

    def _date_kinds(self, date: str, patient: str | None) -> set[str]:
        owners = self.dates[date]
        if patient is None:
            return set().union(*owners.values())
        kinds = set(owners.get("", set()))
        if patient in owners:
            shift = self.shifts.get(patient)
            if shift is not None and _shift(date, -shift) in self.patient_dates.get(patient, ()):
                return kinds  # explained as the shifted image of another date of this patient
            kinds |= owners[patient]
        return kinds


def load_identifiers(ingest_dir: Path) -> list[tuple[str, str, str]]:
    """(patient_id, kind, value) from ``identifiers.csv`` and the manifest's identifying columns."""
    ingest_dir = Path(ingest_dir)
    entries: list[tuple[str, str, str]] = []
    path = ingest_dir / "identifiers.csv"
    if path.is_file():
        for row in _read_csv(path):
            entries.append((row.get("patient_id", ""), row.get("tag", ""), row.get("value", "")))
    for row in _read_csv(ingest_dir / "manifest.csv") if (ingest_dir / "manifest.csv").is_file() else []:
        for column in MANIFEST_IDENTIFIER_COLUMNS:
            if row.get(column):
                entries.append((row.get("patient_id", ""), column, row[column]))
    return entries


def collect_identifiers(ds) -> list[tuple[str, str]]:
    """(tag path, value) of every identifying value in a data set, recursively: person names,
    dates, instance UIDs, free text, ids, institution/station/device names and every private
    string.  Used to build ``identifiers.csv``-like lists (tests, :func:`audit_tree`)."""
    keywords = {
        "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber", "StudyID",
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
        "DeviceSerialNumber", "RequestedProcedureID", "ScheduledProcedureStepID",
        "PerformedProcedureStepID", "AdmissionID", "MedicalRecordLocator", "StudyDescription",
        "SeriesDescription", "ProtocolName", "PatientAddress", "PatientTelephoneNumbers",
    }
    out: list[tuple[str, str]] = []

    def walk(d, prefix: str) -> None:
        for tag in list(d.keys()):
            try:
                elem = d[tag]
            except Exception:
                continue
            name = prefix + _name(elem.tag, elem.keyword)
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or []):
                    walk(item, f"{name}[{i}].")
                continue
            if tag.group in (0x0002, 0x7FE0) or tag.element == 0:
                continue
            private = bool(tag.group & 1)
            if private and tag.element < 0x1000:
                continue  # private creator
            wanted = (private and elem.VR not in NUMERIC_VRS and not isinstance(elem.value, bytes)) or \
                elem.VR in ("PN", "DA", "DT", "LT", "ST", "UT", "UC") or elem.keyword in keywords or \
                (elem.VR == "UI")
            if not wanted:
                continue
            for v in _strings(elem.value):
                v = v.strip().strip("\x00").strip()
                if len(v) < 3 or (elem.VR == "UI" and v.startswith(STANDARD_UID_ROOT)):
                    continue
                out.append((name, v))

    walk(ds, "")
    return out


# ---------------------------------------------------------------------------------------------
# scanning


def _name(tag, keyword: str) -> str:
    if (tag.group & 1) or not keyword:
        return f"({tag.group:04X},{tag.element:04X})"
    return keyword


def _strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value).decode("latin-1")] if len(value) <= MAX_BINARY else []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value if v is not None]
    return [str(value)]


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
                yield prefix + _name(raw.tag, ""), "UN", bytes(value).decode("latin-1"), False
            continue
        where = prefix + _name(elem.tag, elem.keyword)
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                yield from _walk_dicom(item, f"{where}[{i}].")
            continue
        if int(elem.tag) in PIXEL_TAGS or elem.keyword in UNSEARCHED_ELEMENTS or (
                standard_code and elem.keyword in CODE_ELEMENTS):
            continue
        values = _strings(elem.value)
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
        from haven.deid import redact

        self.modalities = {m.upper() for m in (modalities if modalities is not None
                                                 else redact.DEFAULT_PIXEL_OPTIONS["modalities"])}
        self.enabled = enabled and redact.ocr_available()
        self.read = 0
        self.not_read = 0

    def applies(self, ds) -> bool:
        from haven.deid import redact

        return redact.may_carry_text(ds, self.modalities)

    def text(self, ds) -> str | None:
        """The pixel text (None: not read: no OCR engine, or undecodable pixels)."""
        from haven.deid import redact

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
        texts = [redact.read_lines(redact.ocr_gray(frames[f], photometric))
                 for f in redact.sample_frames(len(frames), redact.DEFAULT_PIXEL_OPTIONS["frames"])]
        self.read += 1
        return pixel_text_variants("\n".join(texts))


def _scan_dicom(path: Path, ids: Identifiers, patient: str | None,
                pixels: PixelText | None = None) -> Iterator[tuple[str, str]]:
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        if pixels is not None and pixels.applies(ds):
            text = pixels.text(ds)
            for kind in ids.match(text or "", "LT", patient):
                yield "(7FE0,0010) burned-in text", kind
    preamble = getattr(ds, "preamble", None)
    if preamble and preamble.strip(b"\x00"):
        for kind in ids.match(preamble.decode("latin-1"), "UN", patient):
            yield "preamble", kind
    meta = getattr(ds, "file_meta", None)
    sources = ([meta] if meta is not None else []) + [ds]
    for d in sources:
        for where, vr, text, public in _walk_dicom(d):
            for kind in ids.match(text, vr, patient, public):
                yield where, kind


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
            yield where, "metadata"
            for kind in ids.match(payload.decode("latin-1"), "UN", patient):
                yield where, kind
        return
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        for ctype, payload in _png_chunks(data):
            if ctype in _PNG_TEXT_CHUNKS:
                where = f"PNG {ctype.decode('latin-1')} chunk"
                yield where, "metadata"
                for kind in ids.match(_png_text(ctype, payload), "UN", patient):
                    yield where, kind
        return
    from PIL import Image

    with Image.open(path) as im:
        tags = getattr(im, "tag_v2", None)
        if tags is not None:
            for number, name in _TIFF_TEXT_TAGS.items():
                if number in tags:
                    where = f"TIFF {name} tag"
                    yield where, "metadata"
                    for kind in ids.match(str(tags[number]), "UN", patient):
                        yield where, kind
        for k in im.info:
            if k in ("comment", "exif", "xmp", "XML:com.adobe.xmp", "photoshop", "iptc"):
                yield f"image info {k}", "metadata"


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [dict(r) for r in csv.DictReader(fh)]


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _scan_file(path: Path, rel: str, ids: Identifiers, patient: str | None,
               pixels: PixelText | None = None) -> list[dict]:
    findings: list[dict] = []
    seen: set[tuple[str, str]] = set()
    # a finding must not carry the value: path components that match are redacted
    parts = list(Path(rel).parts)
    shown = [("[redacted]" if ids.match(p, None, patient) or ids.match(Path(p).stem, None, patient)
              else p) for p in parts]
    if ids.match(rel, None, patient) or ids.match(str(Path(rel).with_suffix("")), None, patient):
        shown = ["[redacted]" for _ in parts] if shown == parts else shown
    label = "/".join(shown)

    def add(where: str, kind: str) -> None:
        if (where, kind) not in seen:
            seen.add((where, kind))
            findings.append({"file": label, "where": where, "kind": kind})

    names = {rel, str(Path(rel).with_suffix(""))}
    for part in parts:
        names |= {part, Path(part).stem}
    for name in names:
        for kind in ids.match(name, None, patient):
            add("file name", kind)
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            hits = _scan_image(path, ids, patient)
        elif _is_dicom_file(path):
            hits = _scan_dicom(path, ids, patient, pixels)
        else:
            hits = iter([("file", "unknown file type")])
        for where, kind in hits:
            add(where, kind)
    except Exception as e:  # a file the audit cannot read cannot be proven clean
        add("file", f"unreadable ({type(e).__name__})")
    return findings


SNAKEMAKE_MARKER = ".snakemake_timestamp"


def _scan_tree(root: Path, ids: Identifiers, patient_of: dict[str, str] | None = None,
               pixels: PixelText | None = None) -> tuple[int, list]:
    files = 0
    findings: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if name == SNAKEMAKE_MARKER and path.stat().st_size == 0:
                continue  # Snakemake's empty marker in a directory() output (one per shard folder)
            files += 1
            patient = patient_of.get(rel) if patient_of else None
            findings.extend(_scan_file(path, rel, ids, patient, pixels))
    return files, findings


def _scan_csv(path: Path, ids: Identifiers) -> list[dict]:
    findings = []
    if not path.is_file():
        return findings
    seen = set()
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        for kind in set().union(*(ids.match(h) for h in header)) if header else set():
            seen.add(("header", kind))
            findings.append({"file": path.name, "where": f"{path.name}:header", "kind": kind})
        for row in reader:
            for column, cell in zip(header, row):
                if column in INTEGER_COLUMNS and cell.isdigit():
                    continue  # counters written by anonymize (row index, number of actions)
                for kind in ids.match(cell):
                    if (column, kind) not in seen:
                        seen.add((column, kind))
                        findings.append({"file": path.name, "where": f"{path.name}:{column}", "kind": kind})
    return findings


def _result(files: int, findings: list[dict], ids: Identifiers, pixels: PixelText | None = None) -> dict:
    out = {"passed": not findings, "files": files, "findings": findings,
           "identifiers": ids.count, "identifiers_not_searched": ids.skipped}
    if pixels is not None:
        out["pixel_text_read"] = pixels.read
        out["pixel_text_not_read"] = pixels.not_read
    return out


# ---------------------------------------------------------------------------------------------
# entry points


def audit(anon_dir: Path, ingest_dir: Path, key: bytes | None = None, max_shift_days: int = 3650,
          ocr_modalities: Iterable[str] | None = None, ocr: bool = True, clean_descriptors: bool = False,
          retain_uids: bool = False, safe_private: list[dict] | None = None,
          deface: dict | None = None) -> dict:
    """Audit ``anon_dir`` (the anonymize stage's output) against ``ingest_dir``'s identifiers.

    Returns ``{"passed", "files", "findings": [{"file", "where", "kind"}], ...}``; a finding
    never carries the matched value.  ``key`` is optional: with it, a date that equals one of
    the patient's original dates *and* is the shifted image of another of them (a coincidence
    of the day shift) is not reported.  Files that may carry burned-in text (BurnedInAnnotation
    YES or one of ``ocr_modalities``, default :data:`haven.deid.redact.DEFAULT_PIXEL_OPTIONS`) have
    their pixels read by OCR and the text matched too (``ocr=False`` or no OCR engine: counted in
    ``pixel_text_not_read``).  ``clean_descriptors``/``retain_uids``: the anonymize options of
    that name were on (the descriptions' whole values and the UIDs are then not searched);
    ``safe_private``: the Retain Safe Private allow-list (``anonymize.safe_private``).
    ``deface``: the project's ``anonymize.deface`` settings; when enabled, every file of a head
    volume it covers must say it was defaced (RecognizableVisualFeatures NO and code 113102).
    """
    anon_dir, ingest_dir = Path(anon_dir), Path(ingest_dir)
    if not (ingest_dir / "identifiers.csv").is_file():
        raise FileNotFoundError(f"{ingest_dir / 'identifiers.csv'} not found: the audit needs the "
                                f"identifiers recorded by `haven ingest`")
    entries = load_identifiers(ingest_dir)
    shifts = None
    if key is not None:
        from haven import keys

        shifts = {p: keys.day_shift(key, p, max_shift_days) for p in {e[0] for e in entries if e[0]}}
    retained = ()
    if clean_descriptors:

        retained = CLEAN_DESCRIPTORS
    safe = ()
    if safe_private:

        safe = {(g, o) for (g, _), offsets in safe_private_table(safe_private).items() for o in offsets}
    ids = Identifiers(entries, shifts, retained, retain_uids, safe)

    # link every output file to the patient of its input (for the per-patient date check)
    patient_of: dict[str, str] = {}
    manifest_path, log_path = ingest_dir / "manifest.csv", anon_dir / "anonymization.log.csv"
    if manifest_path.is_file() and log_path.is_file():
        inputs = _read_csv(manifest_path)
        for row in _read_csv(log_path):
            try:
                index = int(row.get("input_index", ""))
            except ValueError:
                continue
            if row.get("output") and 0 <= index < len(inputs):
                patient_of[row["output"]] = inputs[index].get("patient_id", "")

    data = anon_dir / "data"
    pixels = PixelText(ocr_modalities, ocr)
    files, findings = _scan_tree(data, ids, patient_of, pixels) if data.is_dir() else (0, [])
    for name in ("data", "manifest.csv", "anonymization.log.csv"):
        if not (anon_dir / name).exists():  # fail closed: an incomplete output is not clean
            findings.append({"file": name, "where": name, "kind": "missing"})
    for name in ("manifest.csv", "anonymization.log.csv"):
        findings.extend(_scan_csv(anon_dir / name, ids))
    if deface and deface.get("enabled") and (anon_dir / "manifest.csv").is_file():
        findings.extend(_check_defaced(data, _read_csv(anon_dir / "manifest.csv"), deface))
    return _result(files, findings, ids, pixels)


def _check_defaced(data: Path, manifest: list[dict], deface_options: dict) -> list[dict]:
    """A finding for every file of a head volume the project defaces that does not say so."""
    import pydicom

    from haven.deid import deface

    opts = deface.options(deface_options)
    findings = []
    for files in deface.candidates(manifest, opts).values():
        headers = {}
        for f in files:
            try:
                headers[f] = pydicom.dcmread(data / f, stop_before_pixels=True)
            except Exception as e:
                findings.append({"file": f, "where": "file", "kind": f"unreadable ({type(e).__name__})"})
        if deface.slices(headers.values()) < int(opts["min_slices"]):
            continue
        for f, ds in headers.items():
            if not deface.applies(ds, opts):
                continue
            codes = {str(i.get("CodeValue", "")) for i in ds.get("DeidentificationMethodCodeSequence", [])}
            if str(ds.get("RecognizableVisualFeatures", "")).upper() != "NO" or deface.CODE[0] not in codes:
                findings.append({"file": f, "where": "(0028,0302) RecognizableVisualFeatures",
                                 "kind": "head volume not defaced"})
    return findings


def audit_tree(root: Path, identifiers: set[str] | Iterable[str] | Path | str, ocr: bool = True) -> dict:
    """Audit every file under ``root`` against ``identifiers``: an ``identifiers.csv`` path (its
    folder's ``manifest.csv`` is used too when present) or a set of values (kind ``identifier``)."""
    root = Path(root)
    if isinstance(identifiers, (str, Path)):
        path = Path(identifiers)
        if path.is_dir():
            entries = load_identifiers(path)
        elif path.name == "identifiers.csv" and (path.parent / "manifest.csv").is_file():
            entries = load_identifiers(path.parent)
        else:
            entries = [(r.get("patient_id", ""), r.get("tag", ""), r.get("value", ""))
                       for r in _read_csv(path)]
    else:
        entries = [("", "identifier", v) for v in identifiers]
    ids = Identifiers(entries)
    pixels = PixelText(None, ocr)
    files, findings = _scan_tree(root, ids, None, pixels) if root.is_dir() else (0, [])
    if root.is_file():
        files, findings = 1, _scan_file(root, root.name, ids, None, pixels)
    return _result(files, findings, ids, pixels)


def write_audit_result(result: dict, out_json: Path) -> Path:
    """Write the audit result as JSON, atomically (no partial file after a kill)."""
    return atomic_write_text(Path(out_json), json.dumps(result, indent=2, sort_keys=True) + "\n")
