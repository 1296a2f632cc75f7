"""Progress of long stages: a bar on a terminal, a plain line in the log every so often.

``with progress("ingest", total=n, log=log) as p: ... p.update()`` after each file.  On a
terminal (stderr a TTY, ``HAVEN_PROGRESS`` not ``0``, ``CI`` not set) it draws a tqdm bar;
anywhere else (Snakemake's log files, Slurm, CI) it logs through the stage's logger every
``HAVEN_PROGRESS_INTERVAL`` seconds (default :data:`INTERVAL`) and once at the end::

    ingest: 1200/5000 files (24%), 310 files/s, 3 quarantined

Only counts and rates are ever shown: the helper is never given a file name, a patient or a
value, so neither the bar nor the lines can carry one (the stages run inside the safe haven and
their logs leave it).

The hot loops call :meth:`Progress.update` once per file (anonymize does ~200 files/s and is
benchmarked): it adds to counters and reads the monotonic clock once; text is formatted only
when a line is due.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from time import monotonic

#: seconds between two log lines when no bar is drawn (``HAVEN_PROGRESS_INTERVAL`` overrides it)
INTERVAL = 30.0
#: seconds between two refreshes of the bar's counts (tqdm paces its own redraws)
BAR_INTERVAL = 0.5


def bar_wanted(stream=None, env=None) -> bool:
    """Whether a bar is drawn: on a terminal only, and never in CI or with ``HAVEN_PROGRESS=0``."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    if env.get("HAVEN_PROGRESS", "").strip() == "0" or env.get("CI"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def log_interval(env=None) -> float:
    """Seconds between log lines: ``HAVEN_PROGRESS_INTERVAL``, else :data:`INTERVAL`."""
    env = os.environ if env is None else env
    raw = env.get("HAVEN_PROGRESS_INTERVAL", "").strip()
    try:
        value = float(raw) if raw else INTERVAL
    except ValueError:
        raise ValueError(f"HAVEN_PROGRESS_INTERVAL={raw!r} is not a number of seconds") from None
    return max(value, 0.0)


class Progress:
    """One stage's progress: ``done`` of ``total`` (None: not known up front) and named counters."""

    def __init__(self, stage: str, total: int | None = None, *, log: logging.Logger | None = None,
                 unit: str = "files", counts: Callable[[], dict] | None = None,
                 interval: float | None = None, bar: bool | None = None):
        self.stage, self.total, self.unit = stage, total, unit
        self.log = log or logging.getLogger("haven.progress")
        self.done = 0
        self.counts: dict[str, int] = {}
        self._counts_of = counts  # called only when a line is due: no per-file work for the caller
        self._bar = _bar(stage, total, unit) if (bar_wanted() if bar is None else bar) else None
        self._interval = BAR_INTERVAL if self._bar is not None else (
            log_interval() if interval is None else float(interval))
        self._start = monotonic()
        self._next = self._start + self._interval

    def update(self, n: int = 1, **counts: int) -> None:
        """``n`` more done; ``counts``: amounts to add to the named counters (``quarantined=1``)."""
        self.done += n
        for name, k in counts.items():
            self.counts[name] = self.counts.get(name, 0) + k
        if self._bar is not None:
            self._bar.update(n)
        now = monotonic()  # the one clock read per call
        if now >= self._next:
            self._next = now + self._interval
            self._tick(now)

    def track(self, items: Iterable) -> Iterator:
        """``items``, one :meth:`update` after the loop's body has handled each (``continue`` too)."""
        for item in items:
            yield item
            self.update()

    def line(self, now: float | None = None) -> str:
        """``ingest: 1200/5000 files (24%), 310 files/s, 3 quarantined``."""
        elapsed = (monotonic() if now is None else now) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        done = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        if self.total:
            done += f" ({100 * self.done // self.total}%)"
        parts = [done, f"{rate:.0f} {self.unit}/s" if rate >= 10 else f"{rate:.1f} {self.unit}/s"]
        parts += [f"{k} {name.replace('_', ' ')}" for name, k in sorted(self._all_counts().items())]
        return f"{self.stage}: " + ", ".join(parts)

    def _all_counts(self) -> dict[str, int]:
        counts = dict(self.counts)
        if self._counts_of is not None:
            counts.update(self._counts_of())
        return counts

    def _tick(self, now: float) -> None:
        if self._bar is None:
            self.log.info("%s", self.line(now))
            return
        counts = self._all_counts()
        if counts:
            self._bar.set_postfix_str(", ".join(f"{k} {n.replace('_', ' ')}" for n, k in sorted(counts.items())),
                                      refresh=False)

    def close(self) -> None:
        """The final state: the bar closed, or the last log line."""
        if self._bar is not None:
            self._tick(monotonic())
            self._bar.close()
            self._bar = None
        else:
            self.log.info("%s", self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(stage: str, total: int | None = None, **kwargs) -> Progress:
    """A :class:`Progress` to use as a context manager (the final line is written on leaving)."""
    return Progress(stage, total, **kwargs)


def _bar(stage: str, total: int | None, unit: str):
    from tqdm import tqdm

    # the description is the stage's name only: tqdm never sees a file name
    return tqdm(total=total, desc=stage, unit=unit[:-1] if unit.endswith("s") else unit,
                file=sys.stderr, dynamic_ncols=True, leave=True)
