"""De-identify one whole-slide image (Aperio SVS layout) and the audit's re-read of one.

* **Names.** ``<patient pseudonym>/<keyed stem><suffix>``: the patient's keyed pseudonym (the
  manifest's ``patient``) and :func:`haven.keys.image_stem` of the input path; nothing of the
  input name survives but its suffix.
* **Pages.** Only the pyramid is kept: level 0, the lower levels (tiled pages of level 0's aspect)
  and the strip thumbnail (page 1).  The thumbnail is kept, not dropped, because tifffile's SVS
  parser (and so tiffslide) takes page 1 as the thumbnail unconditionally: without it the first
  reduced level is read as the thumbnail and the pyramid loses a level.  It is a downsampled
  level 0 (checked: strips, level 0's aspect, not flagged or described as label/macro), so it
  shows nothing the levels do not.  The label and macro images (the glass label: name, MRN,
  barcode) and any other page are dropped.
* **Pixels.** Every tile's (strip's) compressed bytes are copied as stored, with the tags they need
  to decode (compression, photometric, subsampling, JPEGTables, tile size): no decode/re-encode,
  no generation loss, and the rewrite runs at disk speed.
* **Text.** Each kept page's ImageDescription is rebuilt: the Aperio header, the geometry line
  (kept when it is only numbers in Aperio's shape, else rebuilt from the page), on level 0 the keys
  of :data:`ALLOWED_KEYS` whose values are numbers, and haven's mark (:data:`MARK_ITEM`).  No other
  text tag is written (tifffile's Software tag is switched off).

Bytes are deterministic: tifffile writes no time stamp unless asked, and the pages are written in
their input order.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path, PurePosixPath

from haven import keys
from haven.deid.errors import AnonymizeError
from haven.deid.volumes import MARK
from haven.deid.writer import TMP_PREFIX
from haven.sources.slides import truncation  # the reader's check, from the page table alone

# Description keys kept on level 0, each a number (a value that is not one is dropped). Why safe:
ALLOWED_KEYS = {
    "AppMag": "the objective's magnification (20, 40): optics, the same for every slide of a scanner"
              " model; tiffslide/openslide report it as objective-power",
    "MPP": "microns per pixel: geometry; tiling reads it to tile at a target resolution",
    "OriginalWidth": "the scan's width in pixels before cropping: geometry",
    "OriginalHeight": "the scan's height in pixels before cropping: geometry",
    "Left": "the scanned area's position on the glass in mm: geometry of the slide, not of a person",
    "Top": "as Left",
}
# NOT kept (every other key, by construction): Date, Time, Time Zone (when the patient's tissue was
# scanned), User (a person), Filename and Title (often the patient's name or accession), ScanScope ID
# and ImageID (a scanner and a database record: re-identify through the site's records), ICC profile
# descriptions, focus/calibration keys that are not needed.
MARK_KEY = "Deidentified"
MARK_ITEM = f"{MARK_KEY} = {MARK}"  # the text of haven.deid.volumes.MARK, in Aperio's key = value shape
LIBRARY = re.compile(r"Aperio Image Library v[0-9.]{1,16} ?")
# Aperio's geometry line: "W x H [x,y WxH] (tile) -> w x h JPEG/RGB Q=30", numbers and fixed words only
GEOMETRY = re.compile(r"\d+x\d+(?: \[\d+,\d+ \d+x\d+\])?(?: \(\d+x\d+\))?(?: -> \d+x\d+)?"
                      r"(?: (?:JPEG|J2K|LZW|RAW)/(?:RGB|YCC|YCbCr)(?: Q=\d+)?)?(?: - ?)?")
_NUMBER = re.compile(r"-?\d{1,9}(?:\.\d{1,12})?")
_ASSOCIATED = re.compile(r"\b(label|macro)\b", re.IGNORECASE)
# tags that carry text without being of TIFF type ASCII
_TEXT_TAGS = {700: "XMP", 33723: "IPTC", 34377: "Photoshop", 37510: "UserComment"}
_HINT = "re-export it from the scanner software as an Aperio SVS (tiled pyramid), or remove it from the source"
_HINT_CUT = "copy it again from the scanner's store (a transfer cut short), then re-run ingest"


def output_name(row: dict, key: bytes) -> str:
    """The relative output path of the slide of an ingest manifest ``row``: keyed pseudonyms only."""
    patient = keys.pseudonym(key, row.get("patient_id", ""))
    rel_in = row.get("path", "")
    suffix = PurePosixPath(rel_in).suffix.lower()
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ".svs"  # a suffix is a kind, not a name
    return f"{patient}/{keys.image_stem(key, rel_in)}{suffix}"


# ---------------------------------------------------------------------------------------------
# pages


def _of_level0_aspect(page, first) -> bool:
    """Whether ``page`` is level 0 downsampled: no larger, height as the width predicts (+-1.5 px)."""
    h0, w0 = first.shape[:2]
    h, w = page.shape[:2]
    return 0 < w <= w0 and 0 < h <= h0 and abs(h - h0 * w / w0) <= 1.5 and page.shape[2:] == first.shape[2:]


def page_role(page, first) -> str:
    """``level``, ``thumbnail``, ``label``, ``macro`` or ``other`` of a page of a slide (``first``:
    its page 0): the flags, the description and the geometry must all say pyramid."""
    word = _ASSOCIATED.search(page.description or "")
    if word:
        return word.group(1).lower()
    if page.subfiletype:  # Aperio's label has NewSubfileType 1, its macro 9
        return "label" if page.subfiletype == 1 else "macro" if page.subfiletype == 9 else "other"
    if page.dtype != first.dtype or not _of_level0_aspect(page, first):
        return "other"
    if page.is_tiled:
        return "level"
    return "thumbnail" if page.index == 1 else "other"


def _description(page, first, keep_keys: bool) -> tuple[str, int]:
    """(the rebuilt ImageDescription of a kept page, how many of its keys were dropped)."""
    lines = (page.description or "").split("|")
    head, _, geometry = lines[0].partition("\n")
    library = head if LIBRARY.fullmatch(head) else "Aperio Image Library"
    if not GEOMETRY.fullmatch(geometry.strip()):
        h, w = page.shape[:2]
        h0, w0 = first.shape[:2]
        tile = f" ({page.tilewidth}x{page.tilelength})" if page.is_tiled else ""
        geometry = f"{w0}x{h0}{tile}" + (f" -> {w}x{h}" if page.index else "")
    items, dropped = [], 0
    for item in lines[1:]:
        name, _, value = (s.strip() for s in item.partition("="))
        if keep_keys and name in ALLOWED_KEYS and _NUMBER.fullmatch(value):
            items.append(f"{name} = {value}")
        else:
            dropped += 1
    return "|".join([f"{library}\n{geometry}", *items, MARK_ITEM]), dropped


def _segments(fh, page):
    """The page's tiles (strips) as stored: compressed bytes, in file order."""
    for offset, count in zip(page.dataoffsets, page.databytecounts):
        fh.seek(offset)
        yield fh.read(count)


def _write_page(tw, fh, page, description: str) -> None:
    """Append ``page`` to ``tw``: its segments copied, the tags to decode them, ``description``."""
    import tifffile

    jpeg = page.compression == tifffile.COMPRESSION.JPEG
    args = {}
    if jpeg and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
        # tifffile would otherwise declare RGB JPEG as YCbCr 2x2: the tags must say what the bytes are
        args = {"subsampling": page.subsampling or (1, 1),
                "compressionargs": {"outcolorspace": page.photometric.name}}
    geometry = {"tile": (page.tilelength, page.tilewidth)} if page.is_tiled else {"rowsperstrip": page.rowsperstrip}
    resolution = {}
    if 282 in page.tags and 283 in page.tags:  # pixel spacing: geometry, kept
        resolution = {"resolution": (page.tags[282].value, page.tags[283].value),
                      "resolutionunit": page.tags[296].value if 296 in page.tags else 1}
    tw.write(_segments(fh, page), shape=page.shape, dtype=page.dtype, photometric=page.photometric,
             planarconfig=page.planarconfig, compression=page.compression, jpegtables=page.jpegtables,
             predictor=page.predictor if page.predictor != 1 else None, description=description,
             software=False, metadata=None, subfiletype=0, **geometry, **resolution, **args)


def deidentify_slide(src: Path, dst: Path) -> dict:
    """Write the de-identified copy of the slide ``src`` to ``dst`` (atomically: a temporary file in
    ``dst``'s folder, replaced into place); returns what was done (counts only, no text of the
    slide).  Raises :class:`AnonymizeError` (a PHI-free reason and the fix; the path travels in
    ``.path``) when the file cannot be rewritten."""
    import tifffile

    src, dst = Path(src), Path(dst)
    done = {"level": 0, "thumbnail": 0, "label": 0, "macro": 0, "other": 0, "keys_dropped": 0,
            "bytes_copied": 0}
    try:
        tif = tifffile.TiffFile(src)
    except Exception as e:
        raise _error(src, f"slide not readable as TIFF ({type(e).__name__})") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=TMP_PREFIX, suffix=".part")  # anonymize removes leftovers
    os.close(fd)
    try:
        with tif:
            first = tif.pages.first
            if not first.is_tiled or not (first.description or "").startswith("Aperio"):
                raise _error(src, "not an Aperio slide (page 0 is not a tiled level with an Aperio description)")
            incomplete = truncation(tif)
            if incomplete:
                raise _error(src, incomplete, _HINT_CUT)
            big = tif.is_bigtiff or src.stat().st_size > 2**32 - 2**28
            with tifffile.TiffWriter(tmp, bigtiff=big, byteorder=tif.byteorder) as tw:
                for page in tif.pages:
                    role = page_role(page, first) if page.index else "level"
                    done[role] += 1
                    if role in ("level", "thumbnail"):
                        text, dropped = _description(page, first, keep_keys=page.index == 0)
                        done["keys_dropped"] += dropped
                        _write_page(tw, tif.filehandle, page, text)
                        done["bytes_copied"] += sum(page.databytecounts)
        os.replace(tmp, dst)
    except AnonymizeError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as e:  # the class name carries no PHI
        Path(tmp).unlink(missing_ok=True)
        raise _error(src, f"slide could not be rewritten ({type(e).__name__})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return done


def _error(src: Path, reason: str, fix: str = _HINT) -> AnonymizeError:
    """A PHI-free error with the fix: its text goes to the quarantine list, so the file (whose
    name may be PHI) travels in ``.path`` only, for a caller that may show it."""
    err = AnonymizeError(f"{reason}: {fix}")
    err.path = src
    return err


# ---------------------------------------------------------------------------------------------
# the audit


def slide_texts(path: Path) -> list[tuple[str, str]]:
    """(where, text) of every text tag of every page of the slide at ``path``: the audit's
    identifier search runs over them."""
    import tifffile

    out = []
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            for tag in page.tags:
                if tag.dtype == tifffile.DATATYPE.ASCII or tag.code in _TEXT_TAGS:
                    value = tag.value
                    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                    out.append((f"page {page.index} {_TEXT_TAGS.get(tag.code, tag.name)}", text))
    return out


def check_slide(path: Path, rel: str | None = None) -> list[dict]:
    """The audit's findings (``file``, ``where``, ``kind``, ``values``) for the output slide at
    ``path`` (named ``rel``, default its file name): a page that is not a pyramid level or the
    thumbnail (a surviving label or macro image above all), a description key off the allow-list,
    a text tag other than the description, or level 0 without haven's mark."""
    import tifffile

    label = rel or Path(path).name
    findings: list[dict] = []

    def add(where: str, kind: str, value: str | None = None) -> None:
        findings.append({"file": label, "where": where, "kind": kind, "values": [value]})

    try:
        with tifffile.TiffFile(path) as tif:
            first = tif.pages.first
            for page in tif.pages:
                _check_page(page, first, add)
    except Exception as e:  # a slide the audit cannot read cannot be proven clean
        add("file", f"unreadable ({type(e).__name__})")
    return findings


def _check_page(page, first, add) -> None:
    """Report through ``add`` what :func:`check_slide` finds on one page."""
    where = f"page {page.index}"
    role = page_role(page, first) if page.index else ("level" if page.is_tiled else "other")
    if role in ("label", "macro"):
        add(where, f"associated {role} image")  # never accepted: value None
    elif role == "other":
        add(where, "page not a pyramid level")
    for tag in page.tags:
        if tag.code == 270:
            continue
        if tag.dtype == 2 or tag.code in _TEXT_TAGS:  # ASCII
            add(f"{where} TIFF {_TEXT_TAGS.get(tag.code, tag.name)} tag", "metadata", str(tag.value))
    items = (page.description or "").split("|")
    head, _, geometry = items[0].partition("\n")
    if (not LIBRARY.fullmatch(head) and head != "Aperio Image Library") or not GEOMETRY.fullmatch(geometry.strip()):
        add(f"{where} ImageDescription", "metadata", items[0])
    for item in items[1:]:
        name, _, value = (s.strip() for s in item.partition("="))
        if item.strip() == MARK_ITEM:
            continue
        if name not in ALLOWED_KEYS or not _NUMBER.fullmatch(value):
            add(f"{where} ImageDescription", "metadata", item.strip())
    if MARK_ITEM not in (s.strip() for s in items[1:]):
        add(f"{where} ImageDescription", "not marked de-identified")
