"""Burned-in text in DICOM pixel data: found, blacked out, or the file is quarantined.

Ultrasound, secondary captures and some angiography/radiography images carry the patient's
name, id, birth date and the institution *in the pixels*; header de-identification does not
touch them.  :func:`clean_pixels` cleans one data set in place, in three steps:

1. **rectangles** configured per device signature (``anonymize.pixels.rectangles``: a
   ``match`` of header values such as ``Manufacturer``/``ManufacturerModelName``/``Rows``/
   ``Columns`` and ``boxes`` of ``[x0, y0, x1, y1]`` pixel corners) are blacked out;
2. **outside the ultrasound regions**: for US with a *Sequence of Ultrasound Regions*, every
   pixel outside the union of the regions is blacked out (the header bar of names and dates
   lies outside them);
3. **OCR**: Tesseract (Debian's ``tesseract-ocr`` through ``pytesseract``) finds the words
   left; each word's box, padded, is blacked out and the result read again, for up to three
   rounds: a file where legible text is still read after them is quarantined, as is a file
   that needs OCR when no OCR engine is installed and no rectangle of the configuration
   matched it.

Multi-frame images (cine loops) are read on a few frames (first, middle, last) and the union
of the boxes is blacked out on every frame: burned-in annotations are fixed overlays.

The cleaned pixels are written uncompressed (*Explicit VR Little Endian*), colour as RGB;
BurnedInAnnotation becomes ``NO`` and the caller adds the *Clean Pixel Data* code (113101).
"""

from __future__ import annotations

import shutil
from functools import lru_cache

import numpy as np

from haven.deid import dicomraw

MATCH_KEYS = ("Manufacturer", "ManufacturerModelName", "Modality", "Rows", "Columns", "StationName",
              "SoftwareVersions")
BORDER = 10  # light pixels added around a frame before OCR
ROUNDS = 3  # OCR rounds that black out text; one more must read nothing legible
CODE_CLEAN_PIXELS = ("113101", "Clean Pixel Data Option")


class PixelCleanError(Exception):
    """Pixels that cannot be cleaned confidently; the message is a PHI-free reason."""


def options(given: dict | None) -> dict:
    """``anonymize.pixels`` checked, what it leaves out from the schema's defaults."""
    from haven.config import section_defaults, with_defaults

    opts = with_defaults(given, section_defaults("anonymize", "pixels"), "anonymize.pixels")
    if opts["clean"] not in ("auto", "all", "off"):
        raise ValueError("anonymize.pixels.clean must be auto, all or off")
    for i, rect in enumerate(opts["rectangles"]):
        boxes = rect.get("boxes") if isinstance(rect, dict) else None
        if not boxes or any(len(b) != 4 or b[0] >= b[2] or b[1] >= b[3] for b in boxes):
            raise ValueError(f"anonymize.pixels.rectangles[{i}]: give boxes as [[x0, y0, x1, y1], ...] "
                             f"with x0 < x1 and y0 < y1")
        bad = set(rect.get("match", {})) - set(MATCH_KEYS)
        if bad:
            raise ValueError(f"anonymize.pixels.rectangles[{i}].match: unknown key(s) {sorted(bad)} "
                             f"(known: {', '.join(MATCH_KEYS)})")
    return opts


@lru_cache(maxsize=1)
def ocr_available() -> bool:
    if shutil.which("tesseract") is None:
        return False
    try:
        __import__("pytesseract")  # importable, not used here
    except ImportError:
        return False
    return True


def may_carry_text(ds, modalities) -> bool:
    """Pixel data flagged BurnedInAnnotation=YES, or of a modality that usually carries text (a NO
    is not trusted there: devices often leave it unset or wrong).  ``modalities``: upper case."""
    if 0x7FE00010 not in ds:
        return False
    flag = dicomraw.text(ds, 0x00280301).strip().upper()  # BurnedInAnnotation
    return flag == "YES" or dicomraw.text(ds, 0x00080060).strip().upper() in modalities  # Modality


def needs_cleaning(ds, opts: dict) -> bool:
    if opts["clean"] == "off" or 0x7FE00010 not in ds:
        return False
    return opts["clean"] == "all" or may_carry_text(ds, {m.upper() for m in opts["modalities"]})


def _matches(ds, match: dict) -> bool:
    for k, want in match.items():
        have = ds.get(k)
        have = "" if have is None else str(have.value if hasattr(have, "value") else have)
        if str(want).strip().casefold() != have.strip().casefold():
            return False
    return True


def frames_of(arr: np.ndarray, ds) -> np.ndarray:
    """The pixels as (frames, rows, cols[, samples])."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return arr if frames > 1 else arr[None]


def ocr_gray(frame: np.ndarray, photometric: str) -> np.ndarray:
    """One frame as 8-bit dark-text-on-light for OCR (text is usually light on dark)."""
    g = frame.max(axis=-1) if frame.ndim == 3 else frame
    g = g.astype(np.float32)
    lo, hi = float(g.min()), float(g.max())
    g = (g - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(g)
    if photometric == "MONOCHROME1":
        g = 255.0 - g
    g = g.astype(np.uint8)
    return 255 - g if g.mean() < 128 else g


def read_words(gray: np.ndarray, scale: int = 1) -> list[tuple[str, float, tuple[int, int, int, int]]]:
    """Tesseract's words: (text, confidence, (x0, y0, x1, y1)) in the frame's pixel coordinates."""
    import pytesseract

    d = pytesseract.image_to_data(_ocr_image(gray, scale), config="--psm 11",
                                  output_type=pytesseract.Output.DICT)
    words = []
    for text, conf, x, y, w, h in zip(d["text"], d["conf"], d["left"], d["top"], d["width"], d["height"]):
        text = str(text).strip()
        if not text or float(conf) < 0:
            continue
        x, y = x - BORDER * scale, y - BORDER * scale
        words.append((text, float(conf), (max(0, x // scale), max(0, y // scale),
                                          -(-(x + w) // scale), -(-(y + h) // scale))))
    return words


def read_lines(gray: np.ndarray, scale: int = 1) -> str:
    """The text Tesseract reads in a frame, one line per text line (for the audit)."""
    import pytesseract

    return pytesseract.image_to_string(_ocr_image(gray, scale), config="--psm 11")


def _ocr_image(gray: np.ndarray, scale: int):
    """The frame as a PIL image for Tesseract: upscaled, with a light border (text touching the
    image edge is not read without one)."""
    from PIL import Image, ImageOps

    img = Image.fromarray(gray)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.LANCZOS)
    return ImageOps.expand(img, border=BORDER * scale, fill=255)


def _is_text(word: str, conf: float, min_conf: float) -> bool:
    n = sum(c.isalnum() for c in word)
    return (n >= 2 and conf >= min_conf) or (n == 1 and conf >= max(min_conf, 60))


def sample_frames(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def clean_pixels(ds, opts: dict) -> int:
    """Black out burned-in text in ``ds`` (in place); the number of regions blacked out.

    Raises :class:`PixelCleanError` when the pixels cannot be cleaned confidently."""
    try:
        arr = ds.pixel_array
    except Exception as e:
        raise PixelCleanError(f"pixel data cannot be decoded for cleaning ({type(e).__name__}): "
                              f"install the pylibjpeg plugins for this transfer syntax") from None
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    stack = np.array(frames_of(arr, ds), copy=True)
    n, rows, cols = stack.shape[:3]
    color = stack.ndim == 4
    black = stack.max() if photometric == "MONOCHROME1" else (0 if photometric.startswith(("RGB", "YBR"))
                                                                 or color else stack.min())
    regions = 0
    mask = np.zeros((rows, cols), dtype=bool)  # pixels to black out

    explicit = False
    for rect in opts["rectangles"]:
        if _matches(ds, rect.get("match", {})):
            for x0, y0, x1, y1 in rect["boxes"]:
                mask[max(0, int(y0)):max(0, int(y1)), max(0, int(x0)):max(0, int(x1))] = True
                regions += 1
            explicit = True

    us = ds.get("SequenceOfUltrasoundRegions") if opts["outside_us_regions"] else None
    if us:
        inside = _inside_regions(us, rows, cols)
        if inside.any():
            mask |= ~inside
            regions += 1

    def apply() -> None:
        if mask.any():
            stack[:, mask] = black

    apply()
    use_ocr = bool(opts["ocr"])
    if use_ocr and not ocr_available():
        if not explicit:
            raise PixelCleanError("burned-in text may be present and no OCR engine is installed: install "
                                  "tesseract-ocr and pytesseract, or configure anonymize.pixels.rectangles "
                                  "for this device")
        use_ocr = False
    if not use_ocr and not explicit and not us:
        raise PixelCleanError("burned-in text may be present and neither OCR nor a rectangle for this "
                              "device applies: enable anonymize.pixels.ocr or add a rectangle")
    if use_ocr:
        regions += _ocr_rounds(stack, mask, photometric, opts, apply)
    _store(ds, stack if n > 1 else stack[0], photometric)
    return regions


def _inside_regions(us, rows: int, cols: int) -> np.ndarray:
    """The pixels inside the union of the Sequence of Ultrasound Regions."""
    inside = np.zeros((rows, cols), dtype=bool)
    for item in us:
        try:
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
        except Exception:
            continue
        inside[max(0, y0):y1 + 1, max(0, x0):x1 + 1] = True
    return inside


def _ocr_rounds(stack: np.ndarray, mask: np.ndarray, photometric: str, opts: dict, apply) -> int:
    """Read, black out, read again: a word half-read next to a blacked-out one is read in the next
    round; the last round must read nothing legible.  Returns the words blacked out."""
    scale = int(opts["ocr_scale"])
    pad, min_conf = int(opts["pad"]), float(opts["min_confidence"])
    frames = sample_frames(stack.shape[0], int(opts["frames"]))
    regions = 0
    for round_ in range(ROUNDS + 1):
        found = left = 0
        for f in frames:
            for word, conf, (x0, y0, x1, y1) in read_words(ocr_gray(stack[f], photometric), scale):
                if _is_text(word, conf, min_conf):
                    mask[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = True
                    found += 1
                    if conf >= float(opts["verify_confidence"]) and sum(ch.isalnum() for ch in word) >= 3:
                        left += 1
        if not found:
            break
        if round_ == ROUNDS:
            if left:
                raise PixelCleanError(f"burned-in text still read after {ROUNDS} rounds of cleaning "
                                      f"({left} word(s)): add a rectangle for this device "
                                      f"(anonymize.pixels.rectangles)")
            break
        regions += found
        apply()
    return regions


def _store(ds, out: np.ndarray, photometric: str) -> None:
    """The cleaned pixels written back uncompressed, BurnedInAnnotation NO."""
    if photometric.startswith("YBR"):
        photometric = "RGB"  # pydicom decodes YBR colour to RGB
    bits = int(ds.get("BitsStored", out.dtype.itemsize * 8) or out.dtype.itemsize * 8)
    if out.dtype.kind not in "ui" or out.dtype.itemsize > 2:
        raise PixelCleanError(f"pixel data of type {out.dtype} cannot be re-encoded after cleaning")
    bits = min(bits, out.dtype.itemsize * 8)
    try:
        ds.set_pixel_data(np.ascontiguousarray(out), photometric, bits, generate_instance_uid=False)
    except NotImplementedError:
        raise PixelCleanError("big-endian pixel data cannot be re-encoded after cleaning: convert the "
                              "file to little endian first (e.g. dcmtk's `dcmconv +te`)") from None
    ds.BurnedInAnnotation = "NO"
