"""Anonymize: de-identify every ingested file into the safe haven (``anonymize/data``).

DICOM files follow the PS3.15 Annex E *Basic Application Level Confidentiality Profile*
with the options haven needs for research (see :data:`DEFAULT_OPTIONS`):

* the per-attribute action table lives in ``haven/data/ps315_basic_profile.csv``
  (``tag,keyword,action``; a curated transcription of Table E.1-1, to be regenerated
  from the standard's DocBook XML later);
* actions: ``X`` remove, ``Z`` empty, ``D`` dummy, ``U`` keyed UID (:func:`haven.keys.uid`),
  ``K`` keep, ``C`` clean (dates: shifted by the per-patient :func:`haven.keys.day_shift`);
* defence in depth beyond the table, applied recursively through every sequence:
  every private element, group length, command/file-meta element in the data set, overlay
  (60xx) and curve (50xx) group is removed; every UI value outside the DICOM root
  ``1.2.840.10008.`` is remapped with the keyed UID (so references between files stay
  consistent); every PN is emptied (``PatientName`` becomes the patient pseudonym); every
  DA/DT is shifted; every free-text element (LT/ST/UT/UC/UR), AE title, UN element and
  descriptive text (``*Comment*``, ``*Description*``, ``*Notes*``, addresses, phone numbers)
  outside the table is removed; the 128-byte preamble is zeroed and the file meta rebuilt.
* Options: *Retain Longitudinal Temporal Information with Modified Dates* (DA/DT shifted,
  TM kept), *Retain Patient Characteristics* (sex, age, size, weight, ... kept; the birth date
  is emptied), *Retain Device Identity* (manufacturer and model are always kept; serial
  numbers, station names and other device identifiers of the table become keyed tokens
  ``D...`` so that the same device keeps one identity without its real value).

Pixel data is copied as read, except in files that may carry burned-in text (BurnedInAnnotation
YES, ultrasound, secondary captures, ...): :mod:`haven.redact` blacks the text out (configured
rectangles, outside the ultrasound regions, OCR) and re-encodes the pixels as Explicit VR Little
Endian, or the file is quarantined when it cannot be cleaned confidently.  Images (PNG, JPEG,
TIFF, BMP) lose every metadata block: JPEG APPn/COM segments are cut at byte level (pixels
bit-identical), the others are re-saved losslessly by PIL from their pixels.

Outputs (all written atomically; a file that cannot be de-identified safely is quarantined and
leaves nothing in ``data/``):

* ``data/<patient pseudonym>/<new StudyInstanceUID>/<new SOPInstanceUID>.dcm`` and
  ``data/I<keyed hash>.<ext>`` for images;
* ``manifest.csv`` (``file,kind,patient,study,series,label,sex,age_band,site,modality``);
* ``anonymization.log.csv`` (``input_index,status,output,actions``; no identifiers);
* ``quarantine.csv`` (``input_index,reason``: the row of ingest/manifest.csv, never the input path).

The result depends only on the inputs and the key: a second run is byte-identical.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import os
import re
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from haven import keys, redact
from haven.audit import STANDARD_SCHEMES
from haven.io import atomic_write_text, csv_text

log = logging.getLogger(__name__)

PROFILE_PATH = Path(__file__).resolve().parent / "data" / "ps315_basic_profile.csv"

MANIFEST_COLUMNS = ["file", "kind", "patient", "study", "series", "label", "sex", "age_band", "site",
                    "modality"]
LOG_COLUMNS = ["input_index", "status", "output", "actions"]
QUARANTINE_COLUMNS = ["input_index", "reason"]  # the index into ingest/manifest.csv: input paths can carry names

DEFAULT_OPTIONS = {
    "age_band_width": 10,
    "retain_device_identity": True,
    "retain_patient_characteristics": True,
    "retain_longitudinal_modified_dates": True,
    "max_shift_days": 3650,
    "clean_descriptors": False,
    "retain_uids": False,
    "pixels": {},  # burned-in text cleaning: haven.redact.DEFAULT_PIXEL_OPTIONS
}

STANDARD_UID_ROOT = "1.2.840.10008."
DUMMY_TEXT = "ANONYMIZED"
TMP_PREFIX = ".tmp-"

# CID 7050 De-identification Method codes (DCM)
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
CODE_DEVICE_IDENTITY = ("113109", "Retain Device Identity Option")
CODE_CLEAN_DESCRIPTORS = ("113105", "Clean Descriptors Option")
CODE_RETAIN_UIDS = ("113110", "Retain UIDs Option")

# Descriptions kept under Clean Descriptors, with every identifying value of their file (names,
# ids, dates in any common spelling, institution, long numbers) cut out of them.  Patient-level
# free text (history, comments, allergies, ...) stays removed even then.
CLEAN_DESCRIPTORS = (
    "StudyDescription", "SeriesDescription", "ProtocolName", "PerformedProcedureStepDescription",
    "RequestedProcedureDescription", "ScheduledProcedureStepDescription", "ImageComments",
    "AcquisitionComments", "DerivationDescription", "FrameComments", "ContrastBolusAgent",
    "BodyPartExamined",
)

# Attributes that Table E.1-1 marks K under Retain Patient Characteristics.
PATIENT_CHARACTERISTICS = (
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "PatientSexNeutered",
    "PregnancyStatus", "SmokingStatus",
)
# Attributes that Table E.1-1 marks K under Retain Device Identity (+ StationAETitle).  haven
# keeps them as keyed tokens (strings), keyed UIDs (UI) or removes them (sequences).
DEVICE_IDENTITY = (
    "CassetteID", "DetectorID", "DeviceDescription", "DeviceLabel", "DeviceSerialNumber", "DeviceUID",
    "GantryID", "GeneratorID", "LensMake", "LensModel", "LensSerialNumber", "LensSpecification",
    "ManufacturerDeviceClassUID", "ManufacturerDeviceIdentifier", "PerformedStationAETitle",
    "PerformedStationGeographicLocationCodeSequence", "PerformedStationName",
    "PerformedStationNameCodeSequence", "PlateID", "ScheduledProcedureStepLocation",
    "ScheduledStationAETitle", "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName",
    "ScheduledStationNameCodeSequence", "ScheduledStudyLocation", "ScheduledStudyLocationAETitle",
    "SourceManufacturer", "SourceSerialNumber", "StationName", "TransducerIdentificationSequence",
    "TreatmentMachineName", "UDISequence", "UniqueDeviceIdentifier", "XRayDetectorID",
    "XRayDetectorLabel", "XRaySourceID", "StationAETitle",
)
# Dates that stay removed/emptied under Retain Longitudinal Temporal Information.
BIRTH_DATES = ("PatientBirthDate", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar",
               "PatientDeathDateInAlternativeCalendar")
# D on a sequence means "replace by a dummy item"; haven removes such sequences (PS3.15 E.1.1
# note 13) except the structural ones below, which are kept and cleaned recursively.
STRUCTURAL_SEQUENCES = ("ContentSequence", "GraphicAnnotationSequence")
# Free-text and network VRs removed wherever the table says nothing.
REMOVE_VRS = frozenset({"LT", "ST", "UT", "UC", "UR", "UN", "AE"})
TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
_DESCRIPTIVE = re.compile(r"Comment|Description|Notes|Narrative|Address|Telephone|Telecom")

_DICOM_SUFFIX = ".dcm"
_IMAGE_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp"}


class AnonymizeError(Exception):
    """A file that cannot be de-identified safely; the message is a PHI-free reason."""


# ---------------------------------------------------------------------------------------------
# the action table


def load_profile(path: Path = PROFILE_PATH) -> dict[str, str]:
    """The table as ``{"(gggg,eeee)": action}`` (repeating groups keep their ``xx``)."""
    rows: dict[str, str] = {}
    with open(path, newline="") as fh:
        lines = (line for line in fh if line.strip() and not line.startswith("#"))
        for row in csv.DictReader(lines):
            action = row["action"].strip().upper()
            if action not in {"X", "Z", "D", "U", "K", "C"}:
                raise ValueError(f"{path}: unknown action {action!r} for {row['tag']}")
            rows[row["tag"].strip().lower()] = action
    return rows


def _tag_int(text: str) -> int | None:
    m = re.fullmatch(r"\(([0-9a-f]{4}),([0-9a-f]{4})\)", text)
    return int(m.group(1) + m.group(2), 16) if m else None


@lru_cache(maxsize=32)
def _actions(dates: bool, patient: bool, device: bool, descriptors: bool = False) -> dict[int, str]:
    """Tag -> action for one option set, with the options applied (computed once)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    def tag(kw: str) -> int:
        t = tag_for_keyword(kw)
        assert t is not None, kw
        return t

    actions: dict[int, str] = {}
    # descriptive free text outside the table (defence in depth)
    for t, entry in DicomDictionary.items():
        if entry[0] in TEXT_VRS and _DESCRIPTIVE.search(entry[4]):
            actions[t] = "X"
    for text, action in load_profile().items():
        t = _tag_int(text)
        if t is not None:  # repeating groups (50xx curves, 60xx overlays) are removed by group
            actions[t] = action
    if dates:
        birth = {tag(k) for k in BIRTH_DATES}
        for t in list(actions):
            try:
                vr = dictionary_VR(t)
            except KeyError:
                continue
            if vr in ("DA", "DT", "TM") and t not in birth:
                actions[t] = "C"
    if patient:
        for kw in PATIENT_CHARACTERISTICS:
            actions[tag(kw)] = "K"
    if device:
        for kw in DEVICE_IDENTITY:
            t = tag(kw)
            vr = dictionary_VR(t)
            actions[t] = "U" if vr == "UI" else "X" if vr == "SQ" else "T"
    if descriptors:
        for kw in CLEAN_DESCRIPTORS:
            actions[tag(kw)] = "S"
    for kw in ("PatientID", "PatientName"):
        actions[tag(kw)] = "P"
    for kw in ("SOPClassUID", "ReferencedSOPClassUID"):
        actions.pop(tag(kw), None)  # remapped only when not a standard UID (the UI default)
    # sequences the table marks D: removed, except the structural ones (kept, cleaned inside)
    structural = {tag(k) for k in STRUCTURAL_SEQUENCES}
    for t, action in list(actions.items()):
        if action == "D" and t not in structural:
            try:
                if dictionary_VR(t) == "SQ":
                    actions[t] = "X"
            except KeyError:
                pass
    for t in structural:
        actions[t] = "K"
    return actions


def profile_size() -> int:
    """Number of attributes in the Annex E table file (repeating groups counted once)."""
    return len(load_profile())


# ---------------------------------------------------------------------------------------------
# values


class _Context:
    """Everything one DICOM file needs: key, patient pseudonym, date shift, counters."""

    __slots__ = ("key", "pseudonym", "shift", "actions", "changed", "uid_cache", "retain_uids", "phi")

    def __init__(self, key: bytes, pseudonym: str, shift: int, actions: dict[int, str],
                 uid_cache: dict[str, str], retain_uids: bool = False, phi: re.Pattern | None = None):
        self.retain_uids = retain_uids
        self.phi = phi
        self.key = key
        self.pseudonym = pseudonym
        self.shift = shift
        self.actions = actions
        self.changed = 0
        self.uid_cache = uid_cache

    def uid(self, value: str) -> str:
        new = self.uid_cache.get(value)
        if new is None:
            new = self.uid_cache[value] = keys.uid(self.key, value)
        return new


def _shift_date(value: str, days: int) -> str:
    """``YYYYMMDD`` (or ACR-NEMA ``YYYY.MM.DD``) shifted by ``days``; "" when not a date."""
    s = value.strip()
    if len(s) == 10 and s[4] == "." and s[7] == ".":
        s = s[:4] + s[5:7] + s[8:]
    if len(s) != 8 or not s.isdigit():
        return ""
    try:
        d = dt.date(int(s[:4]), int(s[4:6]), int(s[6:8])) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _shift_datetime(value: str, days: int) -> str:
    s = value.strip()
    if len(s) < 8:
        return ""  # a year or year+month only cannot be shifted exactly: drop it
    head = _shift_date(s[:8], days)
    return head + s[8:] if head else ""


_LONG_NUMBER = re.compile(r"(?<![0-9])[0-9]{5,}(?![0-9])")
_DATE_LIKE = re.compile(r"(?<![0-9])([0-9]{1,4}[/.\-][0-9]{1,2}[/.\-][0-9]{1,4})(?![0-9])")


def phi_pattern(ds) -> re.Pattern | None:
    """One regex for every identifying value of a data set (recursively): person-name parts, ids,
    institution and station names, and each date in the spellings people type."""
    from haven.ingest import IDENTIFYING_KEYWORDS

    terms: set[str] = set()

    def walk(d) -> None:
        for elem in d:
            vr = elem.VR
            if vr == "SQ":
                for item in elem.value or []:
                    walk(item)
                continue
            if vr not in ("PN", "DA", "DT", "LO", "SH", "CS", "ST") or elem.tag.is_private:
                continue
            if vr not in ("PN", "DA", "DT") and elem.keyword not in IDENTIFYING_KEYWORDS:
                continue
            for v in _values(elem.value):
                v = str(v).strip()
                if not v:
                    continue
                if vr == "PN":
                    terms.update(p for p in re.split(r"[\^= ,]+", v) if len(p) >= 2)
                elif vr in ("DA", "DT"):
                    y, m, dd = v[:4], v[4:6], v[6:8]
                    if len(v) >= 8 and v[:8].isdigit():
                        for a, b in ((m, dd), (dd, m)):
                            terms.update({f"{y}{a}{b}", f"{y}-{a}-{b}", f"{y}.{a}.{b}", f"{y}/{a}/{b}",
                                          f"{a}/{b}/{y}", f"{a}.{b}.{y}", f"{a}-{b}-{y}",
                                          f"{int(a)}/{int(b)}/{y}", f"{a}/{b}/{y[2:]}"})
                else:
                    terms.add(v)
                    terms.update(w for w in v.split() if len(w) >= 4)
    walk(ds)
    terms = {t for t in terms if len(t) >= 2}
    if not terms:
        return None
    alternation = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(rf"(?<![0-9A-Za-z])(?:{alternation})(?![0-9A-Za-z])", re.IGNORECASE)


def scrub(text: str, phi: re.Pattern | None) -> str:
    """``text`` without the identifying values of ``phi``, long numbers and dates."""
    if phi is not None:
        text = phi.sub(" ", text)
    text = _DATE_LIKE.sub(" ", _LONG_NUMBER.sub(" ", text))
    text = re.sub(r"\(\s*\)|\[\s*\]", " ", re.sub(r"[\^=]+", " ", text))  # name separators, emptied brackets
    text = re.sub(r"\s+", " ", text).strip(" ,;:-/")
    return text if any(c.isalnum() for c in text) else ""


def _values(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _set(ds, t: int, vr: str, value) -> None:
    ds[t] = DataElement(t, vr, value)


def _vr_of(ds, t: int) -> str:
    elem = ds._dict[t]  # raw or converted element, without converting it
    vr = elem.VR
    if vr is None or vr == "UN":
        entry = DicomDictionary.get(t)
        vr = entry[0] if entry else "UN"
    return vr


def _dummy(vr: str, ctx: _Context):
    if vr in ("LO", "SH", "CS", "LT", "ST", "UT", "UC", "AE"):
        return DUMMY_TEXT
    if vr == "PN":
        return ""
    if vr == "DA":
        return "19000101"
    if vr == "DT":
        return "19000101000000"
    if vr == "TM":
        return "000000"
    if vr in ("IS", "DS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"):
        return 0
    if vr == "AS":
        return "000Y"
    return None


def _clean(ds, ctx: _Context) -> None:
    """De-identify one (nested) data set in place: one pass over its elements."""
    actions = ctx.actions
    for tag in list(ds.keys()):
        t = int(tag)
        group = t >> 16
        if group & 1 or group <= 0x0002 or (t & 0xFFFF) == 0 or (group & 0xFF00) in (0x5000, 0x6000):
            # private, command/meta elements, group lengths, curves and overlays
            del ds[t]
            ctx.changed += 1
            continue
        action = actions.get(t)
        if action == "X":
            del ds[t]
            ctx.changed += 1
            continue
        vr = _vr_of(ds, t)
        if action is None:
            if vr == "SQ":
                action = "K"
            elif vr == "UI":
                action = "U"
            elif vr in ("DA", "DT"):
                action = "C"
            elif vr == "PN":
                action = "Z"
            elif vr in REMOVE_VRS:
                del ds[t]
                ctx.changed += 1
                continue
            else:
                continue  # keep untouched (the raw value is not even decoded)
        _apply(ds, t, vr, action, ctx)
    if 0x00080104 in ds and 0x00080102 in ds:
        _clean_local_code(ds, ctx)


def _clean_local_code(item, ctx: _Context) -> None:
    """A code item of a local coding scheme (``SIEMENS_RIS``, ``99HOSP``...): its meaning is the
    institution's own free text (often the study description), so it becomes the code value."""
    scheme = str(item.get("CodingSchemeDesignator", "") or "").strip()
    if scheme in STANDARD_SCHEMES:
        return
    value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
    meaning = str(item.get("CodeMeaning", "") or "")
    if meaning and meaning != value:
        item.CodeMeaning = value or DUMMY_TEXT
        ctx.changed += 1


def _apply(ds, t: int, vr: str, action: str, ctx: _Context) -> None:
    if vr == "SQ":
        if action in ("K", "U", "C", "D"):
            for item in ds[t].value or []:
                _clean(item, ctx)
        elif action == "Z":
            if ds[t].value:
                _set(ds, t, "SQ", [])
                ctx.changed += 1
        else:  # T, P or anything unexpected on a sequence: remove it
            del ds[t]
            ctx.changed += 1
        return
    if action == "K":
        return
    if " or " in vr:  # an ambiguous VR (US or SS, OB or OW) cannot get a dummy: remove it
        del ds[t]
        ctx.changed += 1
        return
    if action == "P":  # PatientID / PatientName: the keyed patient pseudonym
        _set(ds, t, "PN" if t == 0x00100010 else "LO", ctx.pseudonym)
        ctx.changed += 1
        return
    if action == "Z" or (vr == "PN" and action in ("D", "C", "T", "U")):
        if vr == "PN" or vr in TEXT_VRS or vr in ("CS", "DA", "DT", "TM", "AS", "UI", "IS", "DS", "AE"):
            _set(ds, t, vr, "")
        else:
            _set(ds, t, vr, None)
        ctx.changed += 1
        return
    elem = ds[t]
    if action == "S":  # Clean Descriptors: the text without this file's identifying values
        old = [str(v) for v in _values(elem.value)]
        new = [scrub(v, ctx.phi) for v in old]
        if new != old:
            _set(ds, t, vr, new if len(new) > 1 else (new[0] if new else ""))
            ctx.changed += 1
        return
    if vr == "UI" and ctx.retain_uids:
        return  # Retain UIDs option
    if vr == "UI" and action in ("U", "D", "C", "T"):
        old = _values(elem.value)
        # a standard UID (SOP classes, coding schemes, ...) is kept everywhere, so that
        # references stay consistent; every other UID maps to its keyed 2.25 UID
        new = [str(v) if str(v).startswith(STANDARD_UID_ROOT) else ctx.uid(str(v))
               for v in old if str(v)]
        if new != [str(v) for v in old]:
            _set(ds, t, "UI", new if len(new) > 1 else (new[0] if new else ""))
            ctx.changed += 1
        return
    if action == "C":
        if vr == "DA":
            old = [str(v) for v in _values(elem.value)]
            new = [_shift_date(v, ctx.shift) for v in old]
            new = [v for v in new if v]
        elif vr == "DT":
            old = [str(v) for v in _values(elem.value)]
            new = [_shift_datetime(v, ctx.shift) for v in old]
            new = [v for v in new if v]
        elif vr == "TM":
            return  # times of day carry no date: kept under the modified-dates option
        else:
            action = "D"
            old = new = None
        if action == "C":
            if new != old:
                _set(ds, t, vr, new if len(new) > 1 else (new[0] if new else ""))
                ctx.changed += 1
            return
    if action == "T":  # device identity: one keyed token per value
        old = [str(v) for v in _values(elem.value)]
        if vr in ("LO", "SH", "CS", "AE", "LT", "ST", "UT", "UC"):
            new = [keys.pseudonym(ctx.key, v, prefix="D", length=10) for v in old]
            _set(ds, t, vr, new if len(new) > 1 else (new[0] if new else ""))
        else:
            del ds[t]
        ctx.changed += 1
        return
    # D (and U on a non-UI element): a dummy of the right VR, removal when there is none
    value = _dummy(vr, ctx)
    if value is None:
        del ds[t]
    else:
        _set(ds, t, vr, value)
    ctx.changed += 1


# ---------------------------------------------------------------------------------------------
# DICOM files


def _options(options: dict | None) -> dict:
    opts = dict(DEFAULT_OPTIONS)
    unknown = set(options or {}) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown anonymize option(s): {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(DEFAULT_OPTIONS)})")
    opts.update(options or {})
    opts["pixels"] = redact.options(opts.get("pixels"))
    if int(opts["age_band_width"]) < 1 or int(opts["max_shift_days"]) < 1:
        raise ValueError("age_band_width and max_shift_days must be >= 1")
    return opts


def _method(opts: dict, pixels_cleaned: bool = False) -> tuple[str, list[tuple[str, str]]]:
    codes = [CODE_BASIC]
    if pixels_cleaned:
        codes.append(redact.CODE_CLEAN_PIXELS)
    if opts["clean_descriptors"]:
        codes.append(CODE_CLEAN_DESCRIPTORS)
    if opts["retain_longitudinal_modified_dates"]:
        codes.append(CODE_MODIFIED_DATES)
    if opts["retain_patient_characteristics"]:
        codes.append(CODE_PATIENT_CHARACTERISTICS)
    if opts["retain_device_identity"]:
        codes.append(CODE_DEVICE_IDENTITY)
    if opts["retain_uids"]:
        codes.append(CODE_RETAIN_UIDS)
    text = "haven basic profile; options: " + (" ".join(c for c, _ in codes[1:]) or "none")
    return text, codes


def _transfer_syntax(ds) -> str:
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_complete(ds) -> None:
    """Raise when the file was cut short: pydicom reads a truncated file without complaint."""
    last = next(reversed(ds._dict.values()), None) if len(ds) else None
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if (getattr(last, "is_raw", False) and isinstance(value, bytes) and length is not None
            and length != 0xFFFFFFFF and len(value) < length):
        raise AnonymizeError("truncated DICOM (last element shorter than its length)")
    pixel = next((t for t in (0x7FE00010, 0x7FE00008, 0x7FE00009) if t in ds), None)
    try:
        sop_class = pydicom.uid.UID(str(ds.get("SOPClassUID", "") or ""))
        is_image = "Image Storage" in sop_class.name
    except Exception:
        is_image = False
    if pixel is None:
        if "Rows" in ds or is_image:
            raise AnonymizeError("image attributes without pixel data (truncated?)")
        return
    if pixel != 0x7FE00010:
        return
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and pydicom.uid.UID(str(ts)).is_compressed:
        return  # encapsulated: fragment structure was checked by the reader (delimiters)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        raise AnonymizeError("pixel data without a usable image pixel description") from None
    expected = (rows * cols * samples * frames * bits + 7) // 8
    if ds.get("PhotometricInterpretation", "") in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        expected = expected * 2 // 3
    raw = ds.get_item(0x7FE00010)
    size = len(raw.value) if isinstance(getattr(raw, "value", None), (bytes, bytearray)) else None
    if size is not None and size < expected:
        raise AnonymizeError("pixel data shorter than the image size (truncated?)")


def _option_actions(opts: dict) -> dict[int, str]:
    return _actions(bool(opts["retain_longitudinal_modified_dates"]),
                    bool(opts["retain_patient_characteristics"]),
                    bool(opts["retain_device_identity"]),
                    bool(opts["clean_descriptors"]))


def _deidentify_dicom(src: Path, row: dict, key: bytes, opts: dict, uid_cache: dict,
                      actions: dict[int, str] | None = None) -> tuple:
    """Read and de-identify one DICOM file; return (dataset, relative output path, actions)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(src, force=True)
    except Exception as e:
        raise AnonymizeError(f"DICOM read failed ({type(e).__name__})") from None
    if not isinstance(ds, Dataset) or len(ds) == 0:
        raise AnonymizeError("not a DICOM data set")
    if any("end of file" in str(w.message).lower() for w in caught):
        raise AnonymizeError("truncated DICOM (end of file inside an element)")
    _check_complete(ds)
    media_class = ""
    if getattr(ds, "file_meta", None) is not None:
        media_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if media_class == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
        raise AnonymizeError("DICOMDIR (media directory) is not an image")
    for kw in ("SOPInstanceUID", "SOPClassUID"):
        try:
            ok = bool(str(ds.get(kw, "") or "").strip())
        except Exception:
            ok = False
        if not ok:
            raise AnonymizeError(f"missing {kw}")
    cleaned = redact.needs_cleaning(ds, opts["pixels"])
    blacked = 0
    if cleaned:
        try:
            blacked = redact.clean_pixels(ds, opts["pixels"])
        except redact.PixelCleanError as e:
            raise AnonymizeError(str(e)) from None
        except Exception as e:
            raise AnonymizeError(f"pixel cleaning failed ({type(e).__name__})") from None
    ts = _transfer_syntax(ds)

    patient_id = row.get("patient_id", "")
    pseudonym = keys.pseudonym(key, patient_id)
    shift = keys.day_shift(key, patient_id, int(opts["max_shift_days"]))
    if actions is None:
        actions = _option_actions(opts)
    phi = None
    if opts["clean_descriptors"]:
        try:
            phi = phi_pattern(ds)
        except Exception as e:
            raise AnonymizeError(f"identifying values could not be collected ({type(e).__name__})") from None
    ctx = _Context(key, pseudonym, shift, actions, uid_cache, bool(opts["retain_uids"]), phi)
    try:
        _clean(ds, ctx)
    except AnonymizeError:
        raise
    except Exception as e:
        raise AnonymizeError(f"de-identification failed ({type(e).__name__})") from None

    text, codes = _method(opts, cleaned)
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = text
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = (
        "MODIFIED" if opts["retain_longitudinal_modified_dates"] else "REMOVED")

    sop = str(ds.SOPInstanceUID)
    study = str(ds.get("StudyInstanceUID", "") or "")
    if not study:
        study = keys.uid(key, "haven:no-study:" + patient_id)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PYDICOM " + ".".join(pydicom.__version__.split(".")[:3])
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    rel = f"{pseudonym}/{_safe(study)}/{_safe(sop)}{_DICOM_SUFFIX}"
    return ds, rel, ctx.changed + blacked


def _safe(name: str) -> str:
    """A UID as a file name: only digits and dots can appear (anything else is hashed)."""
    if re.fullmatch(r"[0-9.]{1,64}", name) and name not in (".", ".."):
        return name
    raise AnonymizeError("invalid UID after de-identification")


def _fix_encoding(ds) -> None:
    """A data set read with another encoding than its transfer syntax (e.g. implicit VR in an
    explicit-VR file) needs concrete VRs before it can be written in the declared syntax."""
    from pydicom.filewriter import correct_ambiguous_vr

    ts = pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID))
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


def _write_dicom(ds, target: Path) -> None:
    try:
        _fix_encoding(ds)
    except Exception as e:
        raise AnonymizeError(f"DICOM encoding could not be fixed ({type(e).__name__})") from None
    tmp = _tmp_path(target)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise AnonymizeError(f"DICOM write failed ({type(e).__name__})") from None
        raise


def _tmp_path(target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX, suffix=".part")
    os.close(fd)
    return tmp


def _write_bytes(data: bytes, target: Path) -> None:
    tmp = _tmp_path(target)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# images

_JPEG_STANDALONE = set(range(0xD0, 0xD8)) | {0x01, 0xD8, 0xD9}


def strip_jpeg(data: bytes) -> bytes:
    """Remove every APPn segment (except APP0 JFIF, APP2 ICC profile, APP14 Adobe) and COM
    segment from a JPEG, and anything after EOI, without touching the entropy-coded data."""
    return _strip_jpeg(data)[0]


def _strip_jpeg(data: bytes) -> tuple[bytes, int]:
    if data[:2] != b"\xff\xd8":
        raise AnonymizeError("not a JPEG stream")
    out = bytearray(b"\xff\xd8")
    i, n = 2, len(data)
    removed = 0
    while i < n:
        if data[i] != 0xFF:
            raise AnonymizeError("corrupt JPEG marker structure")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            raise AnonymizeError("truncated JPEG")
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI: stop, drop trailers (other pictures, vendor data)
            out += b"\xff\xd9"
            return bytes(out), removed + (i < n)
        if marker in _JPEG_STANDALONE:
            out += bytes((0xFF, marker))
            continue
        if i + 2 > n:
            raise AnonymizeError("truncated JPEG")
        length = int.from_bytes(data[i:i + 2], "big")
        if length < 2 or i + length > n:
            raise AnonymizeError("truncated JPEG segment")
        payload = data[i + 2:i + length]
        segment = data[i - 2:i + length]
        i += length
        keep = True
        if 0xE0 <= marker <= 0xEF:
            keep = ((marker == 0xE0 and payload.startswith(b"JFIF\x00"))
                    or (marker == 0xE2 and payload.startswith(b"ICC_PROFILE\x00"))
                    or (marker == 0xEE and payload.startswith(b"Adobe")))
        elif marker == 0xFE:
            keep = False
        if keep:
            out += segment
        else:
            removed += 1
        if marker == 0xDA:  # start of scan: copy entropy-coded data up to the next real marker
            j = i
            while True:
                j = data.find(b"\xff", j)
                if j < 0 or j + 1 >= n:
                    raise AnonymizeError("truncated JPEG scan")
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    j += 1 if nxt == 0xFF else 2
                    continue
                break
            out += data[i:j]
            i = j
    raise AnonymizeError("JPEG without EOI")


def _clean_image(src: Path) -> tuple[bytes, str, int]:
    """The de-identified bytes of one image, the output suffix and the metadata items removed."""
    from PIL import Image, ImageSequence

    data = src.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt in ("JPEG", "MPO"):
                stripped, removed = _strip_jpeg(data)
                return stripped, ".jpg", removed
            if fmt not in _IMAGE_FORMATS:
                raise AnonymizeError(f"unsupported image format {fmt}")
            frames = []
            removed = len(set(im.info) - {"transparency", "icc_profile"})
            for frame in ImageSequence.Iterator(im):
                frame.load()
                clean = frame.copy()
                keep = {k: frame.info[k] for k in ("transparency", "icc_profile") if k in frame.info}
                clean.info = keep
                frames.append(clean)
    except AnonymizeError:
        raise
    except Exception as e:
        raise AnonymizeError(f"image read failed ({type(e).__name__})") from None
    buf = io.BytesIO()
    params: dict = {}
    first = frames[0]
    if "icc_profile" in first.info:
        params["icc_profile"] = first.info["icc_profile"]
    if fmt == "PNG" and "transparency" in first.info:
        params["transparency"] = first.info["transparency"]
    try:
        if len(frames) > 1 and fmt == "TIFF":
            first.save(buf, format=fmt, save_all=True, append_images=frames[1:], **params)
        else:
            first.save(buf, format=fmt, **params)
    except Exception as e:
        raise AnonymizeError(f"image write failed ({type(e).__name__})") from None
    return buf.getvalue(), _IMAGE_FORMATS[fmt], removed


# ---------------------------------------------------------------------------------------------
# manifest fields


def age_band(age: str | float | None, width: int = 10) -> str:
    """``"40-49"`` style band of an age in years; 90 and over collapse to ``"90+"``."""
    try:
        years = float(str(age).strip())
    except (TypeError, ValueError):
        return ""
    if years != years or years < 0:  # NaN or negative
        return ""
    if years >= 90:
        return "90+"
    lo = int(years // width) * width
    hi = min(lo + width - 1, 89)
    return f"{lo}-{hi}"


def _sex(value: str) -> str:
    v = (value or "").strip().upper()
    return v if v in ("M", "F", "O") else ""


# ---------------------------------------------------------------------------------------------
# the stage


def _read_manifest(path: Path):
    """The ingest manifest's rows, streamed (a shard job holds only its own rows' results)."""
    if not path.is_file():
        raise FileNotFoundError(f"ingest manifest {path} not found: run `haven ingest` first")

    def rows():
        with open(path, newline="") as fh:
            yield from csv.DictReader(fh)

    return rows()


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def anonymize(source: Path, ingest_dir: Path, out_dir: Path, key: bytes,
              options: dict | None = None, shard: tuple[int, int] = (0, 1), data_dir: Path | None = None) -> dict:
    """De-identify every row of ``ingest_dir/manifest.csv`` from ``source`` into ``out_dir``.

    ``shard=(i, n)``: only the rows whose path falls in shard i of n (:func:`haven.shards.shard_of`),
    their files into ``data_dir`` (default ``out_dir/data``); the shards' tables are merged by
    :func:`haven.shards.merge_anonymize`.  Returns ``{"inputs": n, "anonymized": n, "quarantined": n}``.
    """
    from haven.shards import shard_of

    source, ingest_dir, out_dir = Path(source), Path(ingest_dir), Path(out_dir)
    opts = _options(options)
    width = int(opts["age_band_width"])
    rows = _read_manifest(ingest_dir / "manifest.csv")
    actions = _option_actions(opts)  # a broken action table stops the run here, not per file
    data_dir = Path(data_dir) if data_dir else out_dir / "data"
    part, parts = shard
    data_dir.mkdir(parents=True, exist_ok=True)
    _remove_tmp(data_dir)

    manifest: list[dict] = []
    log_rows: list[dict] = []
    quarantine: list[dict] = []
    produced: dict[str, int] = {}
    uid_cache: dict[str, str] = {}

    inputs = 0
    for index, row in enumerate(rows):
        rel_in = row.get("path", "")
        if parts > 1 and shard_of(rel_in, parts) != part:
            continue
        inputs += 1
        kind = (row.get("kind") or "").strip().lower()
        try:
            src = source / rel_in
            if not rel_in or not _is_inside(src, source):
                raise AnonymizeError("path outside the source folder")
            if not src.is_file():
                raise AnonymizeError("input file not found")
            patient = keys.pseudonym(key, row.get("patient_id", ""))
            if kind == "dicom":
                ds, rel_out, changed = _deidentify_dicom(src, row, key, opts, uid_cache, actions)
                if rel_out in produced:
                    raise AnonymizeError(
                        f"duplicate SOPInstanceUID (same output as input {produced[rel_out]})")
                target = data_dir / rel_out
                created = [p for p in (target.parent.parent, target.parent) if not p.exists()]
                try:
                    _write_dicom(ds, target)
                except BaseException:
                    for p in reversed(created):
                        _rmdir_quiet(p)
                    raise
                # the new UIDs as written in the file (= keys.uid of the originals)
                study = str(ds.get("StudyInstanceUID", "") or "")
                series = str(ds.get("SeriesInstanceUID", "") or "")
                modality = row.get("modality", "")
            elif kind == "image":
                data, suffix, changed = _clean_image(src)
                rel_out = keys.pseudonym(key, rel_in, prefix="I", length=16) + suffix
                if rel_out in produced:
                    raise AnonymizeError(f"duplicate input (same output as input {produced[rel_out]})")
                _write_bytes(data, data_dir / rel_out)
                study = series = modality = ""
            else:
                raise AnonymizeError(f"unknown kind {kind[:16]!r}")
        except AnonymizeError as e:
            quarantine.append({"input_index": index, "reason": str(e)})
            log_rows.append({"input_index": index, "status": "quarantined", "output": "", "actions": 0})
            continue
        except Exception as e:  # never let one file stop the run; the class name carries no PHI
            quarantine.append({"input_index": index, "reason": f"unexpected error ({type(e).__name__})"})
            log_rows.append({"input_index": index, "status": "quarantined", "output": "", "actions": 0})
            continue
        produced[rel_out] = index
        site = (row.get("site") or "").strip()
        manifest.append({
            "file": rel_out,
            "kind": kind,
            "patient": patient,
            "study": study,
            "series": series,
            "label": row.get("label", ""),
            "sex": _sex(row.get("sex", "")),
            "age_band": age_band(row.get("age", ""), width),
            "site": keys.pseudonym(key, site, prefix="S", length=6) if site else "",
            "modality": modality,
        })
        log_rows.append({"input_index": index, "status": "anonymized", "output": rel_out,
                         "actions": changed})

    _remove_stale(data_dir, set(produced))
    atomic_write_text(out_dir / "manifest.csv", csv_text(MANIFEST_COLUMNS, manifest))
    atomic_write_text(out_dir / "anonymization.log.csv", csv_text(LOG_COLUMNS, log_rows))
    atomic_write_text(out_dir / "quarantine.csv", csv_text(QUARANTINE_COLUMNS, quarantine))
    summary = {"inputs": inputs, "anonymized": len(manifest), "quarantined": len(quarantine)}
    log.info("anonymize: %(inputs)d inputs, %(anonymized)d anonymized, %(quarantined)d quarantined",
             summary)
    return summary


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _remove_tmp(data_dir: Path) -> None:
    """Temporary files left by a killed run."""
    for p in data_dir.rglob(TMP_PREFIX + "*"):
        if p.is_file():
            p.unlink(missing_ok=True)


def _remove_stale(data_dir: Path, produced: set[str]) -> None:
    """Outputs of an earlier run that this run did not produce (and emptied folders)."""
    for p in sorted(data_dir.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        rel = p.relative_to(data_dir).as_posix()
        if p.is_file() or p.is_symlink():
            if rel not in produced:
                p.unlink(missing_ok=True)
        elif p.is_dir():
            _rmdir_quiet(p)
