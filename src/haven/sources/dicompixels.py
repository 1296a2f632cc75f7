"""Encapsulated (compressed) DICOM pixel data checked by its structure, without decoding it.

Ingest must quarantine the files whose pixels preprocess could not decode, but decoding every image
(and converting its colour space) was 80 % of ingest's time on compressed CT.  What the structure
shows is checked here instead, from bytes already read:

* the items: every fragment an item tag with a length that fits in the data (a truncated file or
  fragment fails here), the Basic (or Extended) Offset Table pointing at item starts, one offset
  per frame and at least one fragment per frame;
* each frame's codec header: JPEG and JPEG-LS SOI + SOF (rows, columns, components, precision),
  JPEG 2000 SOC + SIZ (the same), the RLE header (segment count and offsets); JPEG and JPEG 2000
  frames must end with their EOI/EOC marker (a cut-off stream).

What only a decoder (that is, preprocess) can catch: damage inside the entropy-coded data (flipped
bits, a stream cut and re-terminated with a valid end marker, corrupt Huffman tables or J2K code
blocks), and a codec feature the installed decoder lacks (e.g. arithmetic-coded JPEG).  Preprocess
stops on such a file with a :class:`haven.learn.preprocess.DecodeError` naming it.
"""

from __future__ import annotations

from haven.sources.base import Quarantine

_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"
_JPEG, _JPEG_LS, _J2K, _RLE = "JPEG", "JPEG-LS", "JPEG 2000", "RLE"
_UIDS = "1.2.840.10008.1.2."
# transfer syntax -> the codec whose header is checked here
CODECS = {
    **{_UIDS + s: _JPEG for s in ("4.50", "4.51", "4.57", "4.70")},
    **{_UIDS + s: _JPEG_LS for s in ("4.80", "4.81")},
    **{_UIDS + s: _J2K for s in ("4.90", "4.91", "4.201", "4.202", "4.203")},
    _UIDS + "5": _RLE,
}
# start-of-frame markers: baseline, extended, progressive, lossless (Huffman and arithmetic) and
# JPEG-LS's SOF55; not DHT (C4), JPG (C8) or DAC (CC)
_SOF = frozenset([*range(0xC0, 0xD0)]) - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def check_encapsulated(ds, data: bytes, codec: str, image, path) -> None:
    """Quarantine encapsulated pixel ``data`` (the raw value, items and all) that is truncated or
    does not match ``image`` (rows, cols, samples, frames, bits from the header)."""
    items = _items(data)
    if not items:
        raise Quarantine("pixel data cannot be decoded: no Basic Offset Table item (not encapsulated?)")
    bot_start, bot_length = items[0]
    fragments = items[1:]
    if not fragments:
        raise Quarantine("pixel data cannot be decoded: encapsulated pixel data without fragments")
    offsets = _offset_table(ds, data[bot_start:bot_start + bot_length], image.frames)
    for number, (first, last) in enumerate(_frames(fragments, offsets, image.frames, data, codec)):
        where = f"frame {number + 1}: " if image.frames > 1 else ""
        frame = fragments[first:last]
        head = data[frame[0][0]:frame[0][0] + frame[0][1]]
        if codec == _RLE:
            _check_rle(b"".join(data[s:s + n] for s, n in frame), image, where)
            continue
        if len(head) < 1024 and len(frame) > 1:  # a header split over fragments: join the start
            head = b"".join(data[s:s + n] for s, n in frame[:8])
        (_check_j2k if codec == _J2K else _check_jpeg)(head, image, codec, where)
        s, n = frame[-1]
        # EOI / EOC, before the padding some writers leave (NUL, or 0xFF fill bytes)
        if not data[s:s + n].rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
            raise Quarantine(f"pixel data cannot be decoded: {where}the {codec} stream has no end marker "
                             "(truncated fragment)")


def _items(data: bytes) -> list[tuple[int, int]]:
    """(start, length) of every item's value; a bad tag or a length past the end: truncated."""
    items, pos, end = [], 0, len(data)
    while pos < end:
        if data[pos:pos + 4] == _SEQUENCE_END:
            break
        if end - pos < 8:
            raise Quarantine(f"pixel data cannot be decoded: {end - pos} stray bytes after the last fragment "
                             "(truncated?)")
        if data[pos:pos + 4] != _ITEM:
            raise Quarantine(f"pixel data cannot be decoded: no item tag at byte {pos} of the encapsulated data "
                             "(truncated or corrupt)")
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        if length > end - pos - 8:
            raise Quarantine(f"pixel data cannot be decoded: a fragment of {length} bytes with only "
                             f"{end - pos - 8} left in the file (truncated)")
        items.append((pos + 8, length))
        pos += 8 + length
    return items


def _offset_table(ds, bot: bytes, frames: int) -> list[int] | None:
    """The frames' offsets (from the first fragment's item tag), from the Extended Offset Table or
    the Basic Offset Table; None when neither lists them."""
    eot = ds._dict.get(0x7FE00001)
    raw = getattr(eot, "value", None) if eot is not None else None
    if isinstance(raw, (bytes, bytearray)) and raw:
        width, table, name = 8, bytes(raw), "Extended Offset Table"
    elif bot:
        width, table, name = 4, bot, "Basic Offset Table"
    else:
        return None
    if len(table) % width or len(table) // width != frames:
        raise Quarantine(f"pixel data cannot be decoded: the {name} lists {len(table) / width:g} frames "
                         f"for {frames} in the header")
    return [int.from_bytes(table[i:i + width], "little") for i in range(0, len(table), width)]


def _frames(fragments, offsets, frames: int, data: bytes, codec: str) -> list[tuple[int, int]]:
    """Each frame's fragments as (first, past last) indices into ``fragments``."""
    if len(fragments) < frames:
        raise Quarantine(f"pixel data cannot be decoded: {len(fragments)} fragments for {frames} frames "
                         "(truncated?)")
    if offsets is None:
        if frames == 1:
            return [(0, len(fragments))]
        if len(fragments) == frames:
            return [(i, i + 1) for i in range(frames)]
        # no table: a frame starts at a fragment opening with its codec's start marker
        start = b"\xff\x4f" if codec == _J2K else b"\xff\xd8"
        firsts = [i for i, (s, _) in enumerate(fragments) if data[s:s + 2] == start]
        if codec == _RLE or len(firsts) != frames or firsts[0] != 0:
            raise Quarantine(f"pixel data cannot be decoded: {len(fragments)} fragments for {frames} frames "
                             "and no offset table to tell them apart")
    else:
        base = fragments[0][0] - 8  # offsets count from the first fragment's item tag
        index = {s - 8 - base: i for i, (s, _) in enumerate(fragments)}
        firsts = [index.get(o) for o in offsets]
        if None in firsts or firsts != sorted(set(firsts)) or firsts[0] != 0:
            raise Quarantine("pixel data cannot be decoded: the offset table does not point at the start "
                             "of each frame's fragments (corrupt or truncated)")
    return list(zip(firsts, [*firsts[1:], len(fragments)]))


def _mismatch(codec: str, where: str, what: str, stream, header) -> Quarantine:
    return Quarantine(f"pixel data does not match the image description: {where}the {codec} stream has "
                      f"{what} {stream}, the header {header}")


def _compare(codec: str, where: str, image, rows: int, cols: int, components: int, precision: int) -> None:
    # rows 0: a JPEG that gives its height in a later DNL marker
    if cols != image.cols or rows not in (image.rows, 0):
        raise _mismatch(codec, where, "rows x columns", f"{rows} x {cols}", f"{image.rows} x {image.cols}")
    if components != image.samples:
        raise _mismatch(codec, where, "components", components, f"SamplesPerPixel {image.samples}")
    # precision against BitsAllocated, not BitsStored: real files often disagree with BitsStored and
    # the decoders follow the stream, but a sample wider than its allocation cannot be stored
    if not 1 <= precision <= image.bits:
        raise _mismatch(codec, where, "precision", f"{precision} bits", f"BitsAllocated {image.bits}")


def _check_jpeg(head: bytes, image, codec: str, where: str) -> None:
    """SOI, then the markers up to the frame header (SOF), whose dimensions are compared, and the
    first scan header (SOS), whose spectral selection must suit the process the SOF names."""
    if head[:2] != b"\xff\xd8":
        raise Quarantine(f"pixel data cannot be decoded: {where}not a {codec} stream (no SOI marker)")
    pos, end, sof = 2, len(head), None
    while pos + 4 <= end and head[pos] == 0xFF:
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in _SOF and sof is None and pos + 10 <= end:
            sof = marker
            precision, rows = head[pos + 4], int.from_bytes(head[pos + 5:pos + 7], "big")
            cols, components = int.from_bytes(head[pos + 7:pos + 9], "big"), head[pos + 9]
            _compare(codec, where, image, rows, cols, components, precision)
        elif marker == 0xDA and sof is not None:
            _check_scan(head[pos + 4:pos + 2 + int.from_bytes(head[pos + 2:pos + 4], "big")], sof, codec, where)
            return
        elif marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            break
        pos += 2 + int.from_bytes(head[pos + 2:pos + 4], "big")
    if sof is None:
        raise Quarantine(f"pixel data cannot be decoded: {where}the {codec} stream has no readable frame "
                         "header (SOF)")


def _check_scan(sos: bytes, sof: int, codec: str, where: str) -> None:
    """A sequential DCT scan covers coefficients 0-63 with no successive approximation; a lossless
    one names a predictor 1-7 (the decoders refuse anything else, e.g. pydicom's JPEG-lossy.dcm)."""
    if not sos or len(sos) < 1 + 2 * sos[0] + 3:
        raise Quarantine(f"pixel data cannot be decoded: {where}the {codec} scan header (SOS) is truncated")
    n = sos[0]
    ss, se, approximation = sos[1 + 2 * n], sos[2 + 2 * n], sos[3 + 2 * n]
    sequential = sof in (0xC0, 0xC1, 0xC9)
    lossless = sof in (0xC3, 0xCB)
    if (sequential and (ss, se, approximation) != (0, 63, 0)) or (lossless and not (1 <= ss <= 7 and se == 0)):
        raise Quarantine(f"pixel data cannot be decoded: {where}the {codec} scan header (SOS) does not suit "
                         f"its frame's coding process (spectral selection {ss}-{se})")


def _check_j2k(head: bytes, image, codec: str, where: str) -> None:
    """SOC + SIZ (a bare codestream, or inside a JP2 file), whose image size is compared."""
    if head.startswith(_JP2_SIGNATURE):
        at = head.find(b"\xff\x4f\xff\x51")
        head = head[at:] if at >= 0 else b""
    if head[:4] != b"\xff\x4f\xff\x51" or len(head) < 42:
        raise Quarantine(f"pixel data cannot be decoded: {where}not a {codec} codestream (no SOC/SIZ marker)")

    def u32(at: int) -> int:
        return int.from_bytes(head[at:at + 4], "big")

    cols, rows = u32(8) - u32(16), u32(12) - u32(20)
    components = int.from_bytes(head[40:42], "big")
    if len(head) < 42 + 3 * components or components < 1:
        raise Quarantine(f"pixel data cannot be decoded: {where}the {codec} SIZ marker is truncated")
    precision = max((head[42 + 3 * c] & 0x7F) + 1 for c in range(components))
    _compare(codec, where, image, rows, cols, components, precision)


def _check_rle(frame: bytes, image, where: str) -> None:
    """The 64-byte RLE header: one segment per byte of a sample per component, offsets in order."""
    if len(frame) < 64:
        raise Quarantine(f"pixel data cannot be decoded: {where}RLE frame shorter than its 64-byte header")
    words = [int.from_bytes(frame[i:i + 4], "little") for i in range(0, 64, 4)]
    segments, offsets = words[0], words[1:1 + min(words[0], 15)]
    expected = image.samples * image.bits // 8
    if segments != expected:
        raise _mismatch(_RLE, where, "segments", segments, f"{expected} (SamplesPerPixel x BitsAllocated / 8)")
    if offsets[0] != 64 or offsets != sorted(offsets) or offsets[-1] >= len(frame):
        raise Quarantine(f"pixel data cannot be decoded: {where}the RLE header's segment offsets do not fit "
                         "the frame (truncated or corrupt)")
