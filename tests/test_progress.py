"""Progress of the long stages: a bar only on a terminal, otherwise plain log lines at the
interval, with counts and rates and never a file name or identifier."""

from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from deidrun import anonymize_into, audit_of
from haven import progress as progress_mod
from haven.ingest import ingest
from haven.progress import Progress, bar_wanted, log_interval, progress
from test_anonymize import KEY
from test_ingest import _ct

# the whole of a progress line: a stage, counts, a rate and named counts, nothing else
LINE = re.compile(r"^(ingest|anonymize|audit|preprocess): \d+(/\d+)? (files|samples)( \(\d+%\))?, "
                  r"\d+(\.\d)? (files|samples)/s(, \d+ [a-z ]+)*$")


def _lines(caplog) -> list[str]:
    """The lines the progress helper logged (through each stage's logger)."""
    return [r.getMessage() for r in caplog.records if r.module == "progress"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_only_on_a_terminal_outside_ci():
    assert not bar_wanted(io.StringIO(), {})
    assert bar_wanted(_Tty(), {})
    assert not bar_wanted(_Tty(), {"CI": "true"})
    assert not bar_wanted(_Tty(), {"HAVEN_PROGRESS": "0"})
    assert bar_wanted(_Tty(), {"HAVEN_PROGRESS": "1"})


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress_mod.sys, "stderr", io.StringIO())
    with progress("ingest", 3) as p:
        assert p._bar is None


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("HAVEN_PROGRESS_INTERVAL", raising=False)
    assert log_interval() == progress_mod.INTERVAL == 30.0
    monkeypatch.setenv("HAVEN_PROGRESS_INTERVAL", "0.5")
    assert log_interval() == 0.5
    monkeypatch.setenv("HAVEN_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="HAVEN_PROGRESS_INTERVAL"):
        log_interval()


def test_lines_at_the_interval_with_counts_and_rate(caplog, monkeypatch):
    clock = iter(float(t) for t in range(100))  # one tick a call: the start, then one per update
    monkeypatch.setattr(progress_mod, "monotonic", lambda: next(clock))
    log = logging.getLogger("haven.test")
    quarantined = []
    with caplog.at_level(logging.INFO, "haven"):
        with Progress("ingest", 10, log=log, interval=4, bar=False,
                      counts=lambda: {"quarantined": len(quarantined)}) as p:
            for i in p.track(range(10)):
                if i % 3 == 0:
                    quarantined.append(i)
    lines = _lines(caplog)
    # start at 0, updates at 1..10: lines when 4 s have passed (t=4, 8) and the final one
    assert lines == ["ingest: 4/10 files (40%), 1.0 files/s, 2 quarantined",
                     "ingest: 8/10 files (80%), 1.0 files/s, 3 quarantined",
                     "ingest: 10/10 files (100%), 0.9 files/s, 4 quarantined"]
    assert all(LINE.match(line) for line in lines)


def test_added_counts_and_no_total(caplog):
    with caplog.at_level(logging.INFO, "haven"):
        with Progress("audit", log=logging.getLogger("haven.test"), interval=3600, bar=False) as p:
            p.update(with_findings=1)
            p.update(with_findings=0)
            p.update(5)
    (line,) = _lines(caplog)
    assert re.fullmatch(r"audit: 7 files, \d+ files/s, 1 with findings", line)


def test_stages_log_counts_never_names(tmp_path, caplog, monkeypatch):
    """Ingest, anonymize and the audit of files named after their patient log lines that carry
    counts only."""
    monkeypatch.setenv("HAVEN_PROGRESS_INTERVAL", "0")  # a line per file
    src = tmp_path / "src"
    _ct(src / "a" / "DOE_JOHN_123.dcm", patient_id="DOE123", name="DOE^JOHN", accession="ACC123")
    _ct(src / "b" / "ROE_JANE_456.dcm", patient_id="ROE456", name="ROE^JANE", accession="ACC456")
    (src / "b" / "SMITH_ANN_789.dcm").write_bytes(b"not a DICOM file")  # quarantined
    with caplog.at_level(logging.INFO, "haven"):
        summary = ingest(src, tmp_path / "ingest")
        anonymize_into(src, tmp_path / "ingest", tmp_path / "anon", KEY)
        result = audit_of(tmp_path / "anon", tmp_path / "ingest", key=KEY)
    assert summary["quarantined"] == 1 and result["passed"]
    lines = _lines(caplog)
    assert "ingest: 3/3 files (100%)" in "\n".join(lines)
    assert lines[-1].startswith("audit: 2/2 files (100%)") and lines[-1].endswith(", 0 with findings")
    assert any(line.startswith("anonymize: 2 files") for line in lines)
    assert sum(line.startswith("ingest:") for line in lines) >= 4  # per file and the final line
    assert all(LINE.match(line) for line in lines), lines
    text = "\n".join(lines)
    for secret in ("DOE", "JOHN", "ROE", "JANE", "SMITH", "ACC", ".dcm", str(tmp_path)):
        assert secret not in text


def test_preprocess_counts_samples_written(tmp_path, caplog, monkeypatch):
    from PIL import Image

    from haven.learn import preprocess as pp

    monkeypatch.setenv("HAVEN_PROGRESS_INTERVAL", "0")
    anon = tmp_path / "anon"
    (anon / "data").mkdir(parents=True)
    rows = []
    for p in range(8):
        name = f"P{p}.png"
        Image.fromarray(np.full((8, 8), 40 + 20 * p, dtype=np.uint8)).save(anon / "data" / name)
        rows.append({"file": name, "kind": "image", "patient": f"P{p}", "study": "", "series": "",
                     "label": "ab"[p % 2], "sex": "", "age_band": "", "site": "", "modality": ""})
    pd.DataFrame(rows).to_csv(anon / "manifest.csv", index=False)
    (anon / "audit.json").write_text(json.dumps({"passed": True}))
    params = {"size": 8, "mode": "gray", "windows": [], "split": {"val": 0.25, "test": 0.25}, "chunk": 2,
              "workers": 1}
    with caplog.at_level(logging.INFO, "haven"):
        pp.preprocess(anon, tmp_path / "pre", params, seed=0)
    lines = [line for line in _lines(caplog) if line.startswith("preprocess:")]
    assert lines[-1].startswith("preprocess: 8/8 samples (100%)")
    assert len(lines) >= 5  # one per chunk written (4 chunks at least) and the final line
    assert all(LINE.match(line) for line in lines), lines
