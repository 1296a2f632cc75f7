"""Small I/O helpers shared by the stages: atomic writes (no partial file after kill -9).

Text goes out and comes back as UTF-8 with ``errors="surrogateescape"`` (:data:`TEXT`): a file
name that is not valid UTF-8 (the Latin-1 bytes ``caf\\xe9.dcm`` from a Windows share) is the
surrogate-escaped str Python gives it, and is written to the PHI-zone tables as its original bytes,
so that reading the table back gives the same str and the file opens again.  Valid text is
encoded exactly as before, byte for byte.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import tempfile
from pathlib import Path

# how every table is encoded (see the module docstring): pass as ``open(path, **TEXT)``
TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs):
    """Open a temporary file beside ``path`` for writing; on success it is renamed over ``path``,
    so a reader (or a run killed half-way) never sees a partial file.  Temporary files of
    ``path`` left by a killed earlier run are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode(**TEXT))


def csv_text(columns: list[str], rows: list[dict]) -> str:
    """Rows as CSV text with a fixed column order (keys outside ``columns`` are ignored)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_rows(path: str | os.PathLike):
    """The rows of a CSV file as dicts, streamed."""
    with open(path, newline="", **TEXT) as fh:
        yield from csv.DictReader(fh)


def write_rows(path: str | os.PathLike, columns: list[str], rows) -> int:
    """Stream rows into ``path`` atomically; returns the count."""
    n = 0
    with atomic_open(path, "w", newline="", **TEXT) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            n += 1
    return n
