"""The identifiers the audit looks for: collected by ingest, compiled for one-pass matching.

Every identifying value ingest recorded (``identifiers.csv``) and the ingest manifest's ids, UIDs,
accession numbers and sites, as ``(patient, kind, value)``; :class:`Identifiers` matches a text
against all of them at once.

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
* a demographic category (BranchOfService, RegionOfResidence, ... :data:`CATEGORY_KEYWORDS`) of
  one patient is not reported as the whole value of a public CS element (a coded term) in a file
  of *another* patient: one patient's BodyPartExamined ABDOMEN is not the junk ABDOMEN in
  another's BranchOfService.  A value any patient has under another kind (name, id, date, ...),
  a file of no known patient, text that is not a CS value (lower case, longer than 16) and CSV
  cells are matched as always;
* placeholders (``ANONYMIZED``, ``UNKNOWN``, ...) identify nobody and are ignored; the device
  type (Manufacturer, ManufacturerModelName) and code values/meanings of standard coding schemes
  (DCM, SCT, LN, ...) are fixed vocabulary and are not searched.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from haven.deid.profile import CATEGORY_KEYWORDS

STANDARD_UID_ROOT = "1.2.840.10008."
MIN_CHARS = 3  # identifiers shorter than this are ignored (a single character matches anything)
LONG_CHARS = 6  # from this length on, identifiers are matched as substrings
MAX_TRIE_CHARS = 400
MEMO_CHARS, MEMO_ENTRIES = 256, 200_000  # match results kept for texts this short, this many  # longer identifiers (rare) are checked one by one
NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "OF",
                         "OD", "OL", "OV", "OW"})
MAX_BINARY = 1 << 16  # binary values larger than this (pixel-like payloads) are not decoded
# identifier kinds that haven keeps on purpose (Retain Patient Characteristics, times of day)
RETAINED_KEYWORDS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight"})
# values that identify nobody (placeholders left by earlier de-identification, test data)
PLACEHOLDERS = frozenset({"anonymized", "anonymised", "anonymous", "anon", "removed", "deidentified",
                          "de-identified", "unknown", "none", "null", "n/a", "not available", "dummy",
                          "test", "default", "other"})
_FREE_TEXT = re.compile(r"Description|Comment|History|Reason|Protocol|Label|Text|Alerts|Allergies|"
                        r"Occupation|Notes|Narrative|Explanation|DisplayName|Title")
MANIFEST_IDENTIFIER_COLUMNS = ("patient_id", "study_uid", "series_uid", "sop_uid", "accession", "site")

_TOKEN = re.compile(r"[\w.\-]+")
_NUMBER = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_TAG_TEXT = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
_CS_VALUE = re.compile(r"[A-Z0-9 _]{1,16}")  # PS3.5 6.2: what a Code String may hold


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
        self.categories: dict[str, set[str]] = {}  # category value -> the patients it is theirs for
        self.not_category: set[str] = set()  # values some entry gives another kind (or no patient)
        self.shifts = shifts or {}
        self.count = 0
        self._memo: dict[tuple, frozenset[str]] = {}
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
        category = keyword in CATEGORY_KEYWORDS and bool(patient)
        for v in variants:
            if len(v) < MIN_CHARS or v in PLACEHOLDERS:
                continue
            if category:
                self.categories.setdefault(v, set()).add(patient)
            else:
                self.not_category.add(v)
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
        the element the text comes from; ``public``: it is a public (even group) element.
        Memoised for short texts: the same values recur in file after file."""
        if not text:
            return set()
        if len(text) > MEMO_CHARS:
            return self._match(text, vr, patient, public)
        key = (text, vr, patient, public)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            found = self._memo[key] = frozenset(self._match(text, vr, patient, public))
        return set(found)

    def _match(self, text: str, vr: str | None, patient: str | None, public: bool) -> set[str]:
        cf = text.casefold()
        kinds: set[str] = set()
        whole = cf.strip()
        tokens = set(_TOKEN.findall(cf))
        tokens.add(whole)
        numeric = vr in NUMERIC_VRS
        coded = self._coded_terms(text, vr, patient, public)
        if self._long_re is not None:
            for m in self._long_re.finditer(cf):
                found = m.group()
                if numeric and found in self.digits and found not in tokens:
                    continue  # an id's digits inside a number (0.000000001) are chance
                if found not in coded:
                    kinds |= self.long[found]
        for v in self._very_long:
            if v in cf:
                kinds |= self.long[v]
        if self.short and not numeric:
            for tok in tokens.intersection(self.short) - coded:
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

    def _coded_terms(self, text: str, vr: str | None, patient: str | None, public: bool) -> set[str]:
        """The values of ``text``, a public CS element of ``patient``'s file, that are coded terms
        and only other patients' demographic categories (not reported: see the module's notes)."""
        if vr != "CS" or not public or not patient or not self.categories:
            return set()
        terms = set()
        for part in text.split("\\"):
            part = part.strip(" \x00")
            cf = part.casefold()
            if _CS_VALUE.fullmatch(part) and cf in self.categories and cf not in self.not_category \
                    and patient not in self.categories[cf]:
                terms.add(cf)
        return terms

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


def load_identifiers(identifiers: Path, manifest: Path | None = None) -> list[tuple[str, str, str]]:
    """(patient_id, kind, value) from ``identifiers`` (ingest's ``identifiers.csv``) and the
    identifying columns of the ingest ``manifest`` (each read when it exists)."""
    identifiers = Path(identifiers)
    entries: list[tuple[str, str, str]] = []
    if identifiers.is_file():
        for row in read_csv(identifiers):
            entries.append((row.get("patient_id", ""), row.get("tag", ""), row.get("value", "")))
    for row in read_csv(Path(manifest)) if manifest is not None and Path(manifest).is_file() else []:
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
            name = prefix + name_of(elem.tag, elem.keyword)
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
            for v in strings(elem.value):
                v = v.strip().strip("\x00").strip()
                if len(v) < 3 or (elem.VR == "UI" and v.startswith(STANDARD_UID_ROOT)):
                    continue
                out.append((name, v))

    walk(ds, "")
    return out


def name_of(tag, keyword: str) -> str:
    if (tag.group & 1) or not keyword:
        return f"({tag.group:04X},{tag.element:04X})"
    return keyword


def strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value).decode("latin-1")] if len(value) <= MAX_BINARY else []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value if v is not None]
    return [str(value)]



def read_csv(path: Path) -> list[dict]:
    # ingest's tables hold file names as their bytes, valid UTF-8 or not (haven.io.TEXT)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return [dict(r) for r in csv.DictReader(fh)]

