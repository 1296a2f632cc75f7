"""Readers of source data, one per kind behind one interface (:class:`haven.sources.base.Reader`).

Ingest asks :func:`read_header` for every file of a source and preprocess asks
:func:`reader_for` the manifest's ``kind`` for its pixels; neither knows a file format.  A new
kind of data is a new module in this package and one entry in :data:`READERS`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from haven.sources.base import HEADER_FIELDS, NO, NotMine, Quarantine, Reader, reason
from haven.sources.bids import volume_suffix
from haven.sources.dicom import DicomReader
from haven.sources.images import ImageReader
from haven.sources.nifti import NiftiReader
from haven.sources.slides import SlideReader

__all__ = ["HEADER_FIELDS", "READERS", "Quarantine", "Reader", "file_suffix", "kind_of", "quiet", "read_header",
           "reader_for", "reason"]

# in order of preference: a tie between two readers' recognise() goes to the first
READERS: tuple[Reader, ...] = (DicomReader(), NiftiReader(), SlideReader(), ImageReader())
_BY_KIND = {r.kind: r for r in READERS}
# every reader's on-sight suffixes but its own (what its guesses give way to), worked out once
_OTHERS = {r.kind: frozenset().union(*(o.suffixes for o in READERS if o is not r)) for r in READERS}
NOT_SUPPORTED = "not " + " or ".join(r.description for r in READERS)
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!", b"BZh")
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")


def file_suffix(name: str) -> str:
    """The lower-case extension readers are told: ``.nii.gz`` whole (a gzip archive otherwise)."""
    return volume_suffix(name) or Path(name).suffix.lower()


def reader_for(kind: str) -> Reader:
    """The reader of a manifest row's ``kind``."""
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise ValueError(f"no reader for files of kind {kind!r} (known: {', '.join(_BY_KIND)})") from None


def kind_of(head: bytes, suffix: str = "") -> str | None:
    """The kind of a file from its first bytes (up to 132) and lower-case suffix, as ingest would
    decide it (the surest reader), else by a reader's signature (:meth:`Reader.misnamed`); None when
    no reader takes them.  For bytes that arrive without a file (a request to the REST service)."""
    best, sure = None, NO
    for r in READERS:
        level = r.recognise(head[:132], suffix, _OTHERS[r.kind])
        if level > sure:
            best, sure = r, level
    if best is None:  # bytes without a (right) name: the reader whose signature they carry
        best = next((r for r in READERS if r.misnamed(head[:132], suffix)), None)
    return best.kind if best is not None else None


def read_header(path: Path, rel: str, check_pixels: bool) -> tuple[dict, list[tuple[str, str]]]:
    """One source file → (manifest row without its label, identifying (tag, value) pairs), or
    :class:`Quarantine` with the reason (any other exception: the caller words it with
    :func:`reason`)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
        if not head:
            raise Quarantine("empty file (0 bytes)")
        suffix = file_suffix(path.name)
        best, sure = None, NO
        for r in READERS:
            level = r.recognise(head, suffix, _OTHERS[r.kind])
            if level > sure:
                best, sure = r, level
        if best is None:
            raise Quarantine(_unclaimed(head, suffix))
        try:
            fields, ids = best.header(path, rel, fh, head, check_pixels=check_pixels)
        except NotMine:
            raise Quarantine(NOT_SUPPORTED) from None
    return {"path": rel, "kind": best.kind, "label": "", **fields}, ids


def _unclaimed(head: bytes, suffix: str) -> str:
    """Why no reader took the file."""
    if head.startswith(_ARCHIVE_MAGIC) or suffix in _ARCHIVE_SUFFIXES:
        # never unpacked here: members would be PHI written outside the output and quarantine
        return "an archive (zip/gzip/7z/rar/tar): unpack it into the source folder to use its files"
    for r in READERS:
        why = r.misnamed(head, suffix)
        if why:
            return why
    return NOT_SUPPORTED


@contextlib.contextmanager
def quiet():
    """Every reader's :meth:`Reader.quiet` at once (around a whole walk of a source)."""
    with contextlib.ExitStack() as stack:
        for r in READERS:
            stack.enter_context(r.quiet())
        yield
