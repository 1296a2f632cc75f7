"""The Reader interface: what ingest and preprocess ask of one kind of data (DICOM, images, ...).

A reader answers four questions about a source file, and the stages ask nothing else:

* whether a file is its kind (:meth:`Reader.recognise`, from the first bytes and the name) and,
  for a file no reader took, whether it is its kind under a wrong name (:meth:`Reader.misnamed`);
* the header fields of the manifest and the identifying values the audit searches for
  (:meth:`Reader.header`), raising :class:`Quarantine` with the reason for a file that cannot
  be used;
* the pixels preprocess stores (:meth:`Reader.pixels`);
* where a file lies in its series, for 2.5D slabs (:meth:`Reader.slice_position`).

A new kind of data (NIfTI volumes, whole-slide images) is one new module beside this one whose
reader is added to ``haven.sources.READERS``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

import numpy as np

# the manifest fields a reader fills (ingest adds path, kind and label); "" when a kind has none
HEADER_FIELDS = ("patient_id", "study_uid", "series_uid", "sop_uid", "accession", "modality",
                 "sex", "age", "site", "rows", "cols", "session", "suffix", "shape", "spacing", "orientation")
# session..orientation: a volume's (haven.sources.nifti): BIDS session and suffix, X x Y x Z voxels,
# their size in mm, the axis codes (RAS...)

# how sure a reader is that a file is its kind (:meth:`Reader.recognise`); the surest reader
# wins, a tie goes to the reader listed first in ``haven.sources.READERS``
NO, GUESS, BY_NAME, BY_CONTENT = 0, 1, 2, 3


class Quarantine(Exception):
    """A file that cannot be accepted; the message is the (PHI-free) reason."""


class NotMine(Quarantine):
    """Raised by :meth:`Reader.header` when a file it guessed (GUESS) is not its kind after all: the
    file is quarantined as one no reader supports."""


def reason(e: BaseException, path: Path) -> str:
    """Exception class + message, without the file's absolute path, on one short line."""
    msg = str(e)
    # the quoted form first, so that a quoted path loses its quotes too; sorted, because a set's
    # order changes from run to run (string hashing) and the reason would with it
    for s in sorted({str(path), repr(str(path)), str(path.resolve())}, key=lambda s: (-len(s), s)):
        msg = msg.replace(s, "<file>")
    msg = " ".join(msg.split())
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class Reader(ABC):
    """One kind of source data."""

    kind: str = ""  # the manifest's ``kind`` column
    description: str = ""  # what it reads, for the message of a file no reader takes
    # names it takes on sight (lower case, with the dot): other readers' guesses give way to them
    suffixes: frozenset[str] = frozenset()

    @abstractmethod
    def recognise(self, head: bytes, suffix: str, others: frozenset[str]) -> int:
        """How sure it is that the file is its kind (NO, GUESS, BY_NAME or BY_CONTENT), from its
        first bytes ``head`` (up to 132), its lower-case ``suffix``, and ``others``: the suffixes
        another reader takes on sight."""

    def misnamed(self, head: bytes, suffix: str) -> str | None:
        """For a file no reader took: the quarantine reason when it is this kind under a wrong name."""
        return None

    @abstractmethod
    def header(self, path: Path, rel: str, fh: BinaryIO, head: bytes, *, check_pixels: bool
               ) -> tuple[dict, list[tuple[str, str]]]:
        """(the :data:`HEADER_FIELDS` of the file, its identifying (tag, value) pairs), read from
        ``fh`` (the open file, at an unknown position) or ``path``; raises :class:`Quarantine`
        (or any exception) for a file that cannot be used.  ``check_pixels``: decode the pixel
        data once so that undecodable files are quarantined at ingest rather than later."""

    @abstractmethod
    def pixels(self, path: Path, mode: str, windows: list[dict]) -> np.ndarray:
        """The image as float32 (C, H, W) in [0, 1] for preprocess ``mode`` (gray, rgb, ct with
        its HU ``windows``)."""

    # whether its files can be slices of a series (manifest ``series``), stacked into 2.5D slabs
    in_series: bool = False

    def slice_position(self, path: str) -> tuple[float, float]:
        """Where a slice lies along its series, as (z, instance number), NaN where unknown
        (only asked of readers ``in_series``)."""
        raise NotImplementedError(f"{self.kind} files are not slices of a series")

    def quiet(self) -> contextlib.AbstractContextManager:
        """A context in which the reader's library neither warns nor logs: its messages may quote
        header values (PHI).  Entered once around a whole walk, not per file."""
        return contextlib.nullcontext()
