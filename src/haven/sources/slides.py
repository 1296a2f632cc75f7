"""Whole-slide images (Aperio ``.svs``, Hamamatsu ``.ndpi``, Leica ``.scn``, tiled pyramidal TIFF).

Read with **tiffslide** (pure Python over tifffile and imagecodecs) rather than its peer
OpenSlide (``openslide-python`` + the ``openslide-bin`` wheel): both read the formats above as
the same levels, associated images and properties, but tiffslide is already how the rest of the
package reads and writes TIFF (tifffile, which it wraps),
needs no native library of its own, gives tiles as arrays (or a zarr group) without a PIL
round trip, and the tiling stage reads many tiles of one open slide, where it is the faster.
Measured on a liver-biopsy demo slide (4096x3072, 256-px JPEG tiles, this 2-core machine,
medians): 96 level-0 256x256 regions from one open slide 0.56 ms each (tiffslide,
``as_array=True``) vs 0.97 ms (openslide); open plus a first region 0.23 + 1.65 ms vs
0.26 + 0.87 ms (openslide wins a cold read, which ingest's one look per file does not make).
MIRAX (``.mrxs``, a file plus a folder of data files) only OpenSlide reads; it is not
taken here (:meth:`SlideReader.misnamed` says how to convert one).

A ``.tif``/``.tiff`` is a slide only when its first page is tiled (seen in the file's first bytes
where the first IFD lies there, as tifffile and most converters write it); a plain (strip,
single-page) TIFF stays :class:`haven.sources.images.ImageReader`'s.

Manifest fields: ``patient_id`` the file's path without its suffix (as for plain images; a label
table's ``patient`` column may give one), ``modality`` SM (DICOM's slide microscopy), ``rows`` and
``cols`` level 0's height and width, ``shape`` ``WxH``, ``spacing`` microns per pixel
``MPPxMPP`` ("" where the scanner wrote none).  Identifying values the audit searches for: every
text tag of every page (ImageDescription, the Aperio description's key=value values such as Date,
Time, User, Filename, Title, ScanScope ID; DateTime, Artist, DocumentName, PageName,
HostComputer, ...; not Software) and the parts of the file name.  The label and macro images'
pixels are the de-identification's concern (they are dropped), not the header's.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import warnings
from pathlib import Path, PurePosixPath

import numpy as np

from haven.sources.base import BY_CONTENT, BY_NAME, HEADER_FIELDS, NO, Quarantine, Reader
from haven.sources.bids import is_number

SUFFIXES = frozenset({".svs", ".ndpi", ".scn"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_SOFTWARE = 305  # the scanner program's name and version: not identifying
_DESCRIPTION = 270
# Aperio description keys that hold numbers or settings of the scanner, never a person or a place
_TECHNICAL = frozenset({"AppMag", "MPP", "StripeWidth", "Left", "Top", "LineCameraSkew", "LineAreaXOffset",
                        "LineAreaYOffset", "Focus Offset", "Exposure Time", "Exposure Scale", "DisplayColor",
                        "OriginalWidth", "OriginalHeight", "Filtered", "Time Zone", "ICC Profile", "Parmset",
                        "ImageID", "SessonMode", "SessionMode", "BitDepth", "Gamma"})
_FIX = "copy the slide again from the scanner's archive (or re-export it there)"


def _tiled_head(head: bytes) -> bool:
    """Whether the TIFF in ``head`` (its first bytes) is tiled: a BigTIFF (plain images are never
    one), or a classic TIFF whose first IFD lies in ``head`` and has no StripOffsets (273) before a
    later tag (tags are sorted by number: past 273 without it, the page is tiled)."""
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return True
    if head[:4] not in (b"II*\x00", b"MM\x00*") or len(head) < 10:
        return False
    end = "<" if head[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", head[4:8])
    if ifd + 2 > len(head):
        return False
    (count,) = struct.unpack(end + "H", head[ifd:ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        if at + 2 > len(head):
            return False
        (tag,) = struct.unpack(end + "H", head[at:at + 2])
        if tag == 273:
            return False
        if tag > 273:
            return True
    return False


class SlideReader(Reader):
    kind = "slide"
    description = "a whole-slide image (svs, ndpi, scn, tiled pyramidal tif)"
    suffixes = SUFFIXES

    def recognise(self, head: bytes, suffix: str, others: frozenset[str]) -> int:
        if suffix in SUFFIXES:
            return BY_NAME
        # BY_CONTENT beats the image reader's BY_NAME for a tiled .tif, and only for one
        return BY_CONTENT if suffix in TIFF_SUFFIXES and _tiled_head(head) else NO

    def misnamed(self, head: bytes, suffix: str) -> str | None:
        if suffix == ".mrxs":
            return ("a MIRAX slide (.mrxs with its data folder) is not read here: convert it to a pyramidal "
                    "tiled TIFF (e.g. `vips tiffsave in.mrxs out.tif --tile --pyramid --compression jpeg`)")
        return None

    def header(self, path: Path, rel: str, fh, head: bytes, *, check_pixels: bool):
        slide = _open(path, head)
        try:
            tf = slide.ts_tifffile
            _check_complete(tf)
            w, h = slide.dimensions
            mpp = slide.properties.get("tiffslide.mpp-x")
            if check_pixels:
                _lowest(slide)
            ids = page_identifiers(tf) + name_identifiers(rel)
        finally:
            slide.close()
        row = dict.fromkeys(HEADER_FIELDS, "")
        row.update(patient_id=str(PurePosixPath(rel).with_suffix("")), modality="SM", rows=h, cols=w,
                   shape=f"{w}x{h}", spacing=f"{float(mpp):.4g}x{float(mpp):.4g}" if mpp else "")
        return row, ids

    def pixels(self, path: Path, mode: str, windows: list[dict]) -> np.ndarray:
        """The lowest pyramid level (a thumbnail of the whole slide) as float32 (C, H, W) in
        [0, 1], RGB or gray as asked; tiles at full resolution are read by the tiling stage."""
        with open(path, "rb") as f:
            head = f.read(132)
        slide = _open(path, head)
        try:
            rgb = _lowest(slide)
        finally:
            slide.close()
        a = rgb.astype(np.float32) / 255.0
        if mode != "rgb":  # ITU-R 601 luma, as PIL's convert("L")
            return (a @ np.array([0.299, 0.587, 0.114], np.float32))[None]
        return a.transpose(2, 0, 1)

    def quiet(self):
        return _quiet_tifffile()


def _open(path: Path, head: bytes):
    """tiffslide's slide, or Quarantine with the reason and the fix."""
    import tiffslide

    if not head.startswith(_TIFF_MAGIC):
        raise Quarantine(f"not a TIFF whole-slide image (no TIFF signature; {_looks_like(head)}): {_FIX}")
    try:
        return tiffslide.TiffSlide(path)
    except Exception as e:  # tifffile's many errors on a damaged file: say what it is, not the path
        raise Quarantine(f"an unreadable whole-slide image ({type(e).__name__}; truncated or damaged?): "
                         f"{_FIX}") from None


def _looks_like(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith((b"<html", b"<!doctype", b"<?xml", b"<head")):
        return "it is an HTML/XML page, e.g. a web server's error saved under the slide's name"
    if not head.strip(b"\x00"):
        return "it is all zero bytes"
    return "its first bytes are no image format"


def truncation(tif) -> str:
    """Why a slide opened with tifffile is incomplete ("" when it is not): tifffile logs a cut IFD
    chain or a tile past the end and reads on, so a transfer cut short would pass as a slide of
    fewer pages.  Checked from the page table alone, without decoding a pixel."""
    fh, t = tif.filehandle, tif.tiff
    last = tif.pages[-1]
    try:
        fh.seek(last.offset)
        count = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))[0]
        fh.seek(last.offset + t.tagnosize + count * t.tagsize)
        following = struct.unpack(t.offsetformat, fh.read(t.offsetsize))[0]
    except struct.error:
        return "slide truncated (its last page is cut)"
    if following:
        return "slide truncated (a page past the end of the file)"
    for page in tif.pages:
        if any(o + n > fh.size or not n for o, n in zip(page.dataoffsets, page.databytecounts)):
            return "slide truncated (a tile past the end of the file)"
    return ""


def _check_complete(tf) -> None:
    why = truncation(tf)
    if why:
        raise Quarantine(f"{why}, a transfer cut short: {_FIX}")


def _lowest(slide) -> np.ndarray:
    """The lowest level decoded, as uint8 RGB (H, W, 3)."""
    level = slide.level_count - 1
    try:
        region = slide.read_region((0, 0), level, slide.level_dimensions[level], as_array=True)
    except Exception as e:
        raise Quarantine(f"a whole-slide image whose tiles do not decode ({type(e).__name__}): {_FIX}") from None
    return np.ascontiguousarray(region[..., :3])


def description_values(text: str) -> list[tuple[str, str]]:
    """(key, value) of an Aperio ImageDescription's identifying key=value fields (``Date``,
    ``Time``, ``User``, ``Filename``, ``Title``, ``ScanScope ID``...; not the numeric settings), or
    the whole text for a description of another kind."""
    if not text.startswith("Aperio"):
        return [("ImageDescription", text.strip())] if text.strip() else []
    out = []
    for part in text.split("|")[1:]:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if sep and value and key not in _TECHNICAL and not is_number(value):
            out.append((f"ImageDescription.{key}", value))
    return out


def page_identifiers(tf) -> list[tuple[str, str]]:
    """(place, value) of every text tag of every page (``page<k>.<TagName>``), the Aperio
    description split into its key=value fields; Software left out (a program's name)."""
    out = []
    for k, page in enumerate(tf.pages):
        for tag in page.tags.values():
            if tag.dtype != 2 or tag.code == _SOFTWARE or not isinstance(tag.value, str):
                continue
            if tag.code == _DESCRIPTION:
                out += [(f"page{k}.{place}", v) for place, v in description_values(tag.value)]
            elif tag.value.strip():
                out.append((f"page{k}.{tag.name}", tag.value.strip()))
    return list(dict.fromkeys(out))


def name_identifiers(rel: str) -> list[tuple[str, str]]:
    """The file's stem and its parts of four or more characters (scanners name slides after
    patients, accessions and dates: ``Smith_J_MRN1234567_1.svs``), but for lower-case words
    (``case``, ``liver``: searched for, they would be found in every output)."""
    stem = PurePosixPath(rel).stem
    parts = [p for p in re.split(r"[_\-. ]+", stem) if len(p) >= 4 and p != stem and not re.fullmatch("[a-z]+", p)]
    return [("file name", stem)] + [("file name part", p) for p in dict.fromkeys(parts)]


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile's warnings and log lines can quote tag values (PHI): silenced around a walk."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
