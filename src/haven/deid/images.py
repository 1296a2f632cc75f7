"""Image metadata stripping: PNG, JPEG, TIFF and BMP lose every metadata block.

JPEG APPn/COM segments are cut at byte level (the pixels stay bit-identical; APP0 JFIF, APP2 ICC
and APP14 Adobe are kept, they describe the pixels); the other formats are re-saved losslessly by
PIL from their pixels (keeping only transparency and the ICC profile).
"""

from __future__ import annotations

import io
from pathlib import Path

from haven.deid.errors import AnonymizeError

IMAGE_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp"}
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


def clean_image(src: Path) -> tuple[bytes, str, int]:
    """The de-identified bytes of one image, the output suffix and the metadata items removed."""
    from PIL import Image, ImageSequence

    data = src.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt in ("JPEG", "MPO"):
                stripped, removed = _strip_jpeg(data)
                return stripped, ".jpg", removed
            if fmt not in IMAGE_FORMATS:
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
    return buf.getvalue(), IMAGE_FORMATS[fmt], removed
