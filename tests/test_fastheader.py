"""The byte-level DICOM parse (haven.deid.rawread) gives what the pydicom path gives: the same ingest
tables, the same anonymized files byte for byte and the same audit, on every file of pydicom's test
data and deid-data (and on truncated and corrupted copies of some of them)."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
deid_data = pytest.importorskip("deid_data")

from haven.deid import dicomfile, rawread, rawscan, scan  # noqa: E402
from haven.sources import dicom as dicom_source  # noqa: E402
from haven.sources.base import Quarantine  # noqa: E402
from haven.sources.dicomheader import codec_of, identifiers  # noqa: E402

KEY = b"fastheader-test-key-" + b"k" * 24


def _corpus_files() -> list[Path]:
    import pydicom.data

    files = [Path(f) for f in pydicom.data.get_testdata_files()]
    files += sorted(p for p in Path(deid_data.__file__).parent.rglob("*") if p.is_file())
    return [f for f in dict.fromkeys(files) if f.is_file() and f.suffix not in (".py", ".pyc")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Every file of both corpora, each in a folder of its own (de-identification only: no labels)."""
    root = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(_corpus_files()):
        (root / f"f{i:04d}").mkdir()
        shutil.copy(f, root / f"f{i:04d}" / f.name)
    return root


def _no_fast(monkeypatch) -> None:
    def unusual(*_a, **_k):
        raise rawread.Unusual("off")

    monkeypatch.setattr(dicom_source, "_parsed_header", unusual)
    monkeypatch.setattr(dicomfile, "_parsed", lambda src: None)
    monkeypatch.setattr(scan, "_scan_parsed", lambda *a: None)


def _run(corpus: Path, out: Path) -> None:
    from haven.deid.anonymize import anonymize
    from haven.deid.audit import gate
    from haven.ingest import ingest

    ingest(corpus, out / "ingest", labels_required=False)
    anonymize(corpus, out / "ingest" / "manifest.csv", KEY, data=out / "data", manifest=out / "manifest.csv",
              log_csv=out / "log.csv", quarantine=out / "quarantine.csv")
    result, _ = gate([out / "data"], out / "manifest.csv", out / "log.csv", out / "ingest" / "identifiers.csv",
                     out / "ingest" / "manifest.csv", out / "audit.json", key=KEY)
    (out / "findings.txt").write_text(repr(result["findings"]))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_parse_and_pydicom_give_the_same_ingest_outputs_and_audit(corpus, tmp_path, monkeypatch):
    warnings.simplefilter("ignore")
    _run(corpus, tmp_path / "fast")
    with monkeypatch.context() as m:
        _no_fast(m)
        _run(corpus, tmp_path / "pydicom")
    fast, slow = _tree(tmp_path / "fast"), _tree(tmp_path / "pydicom")
    assert sorted(fast) == sorted(slow)
    different = [name for name in fast if fast[name] != slow[name] and not name.endswith("audit.json")]
    assert different == []
    assert len([n for n in fast if n.startswith("data/")]) > 50  # anonymized, not quarantined whole
    # the audit.json records no timings: the same result too
    assert fast.get("audit.json") == slow.get("audit.json")


def _header_both(data: bytes, path: Path, check_pixels: bool):
    """(the parse's header or None when it declines, pydicom's header or the quarantine reason)."""
    try:
        fast = dicom_source._parsed_header(data, path, path.name, check_pixels)
    except rawread.Unusual:
        fast = None
    path.write_bytes(data)
    try:
        with open(path, "rb") as fh:
            ds = dicom_source._read_dicom(fh, True, check_pixels, path)
        cs = codec_of(ds)
        slow = (dicom_source._row(ds, cs, path.name), list(identifiers(ds, codec=cs)))
    except Quarantine as q:
        slow = f"quarantined: {q}"
    except Exception as e:  # pydicom's own failure
        slow = f"failed: {type(e).__name__}"
    return fast, slow


def _walk_both(data: bytes, path: Path):
    try:
        fast = list(rawscan.walk(rawread.parse(data)))
    except rawread.Unusual:
        return None, None
    path.write_bytes(data)
    ds = pydicom.dcmread(path, force=True)
    return fast, [t for d in (ds.file_meta, ds) for t in scan._walk_dicom(d) if t[2] != ""]


def test_header_and_audit_walk_equal_pydicoms_on_every_corpus_file(tmp_path):
    warnings.simplefilter("ignore")
    parsed = 0
    for f in _corpus_files():
        data = f.read_bytes()
        for check in (True, False):
            fast, slow = _header_both(data, tmp_path / "f.dcm", check)
            if fast is not None:
                parsed += 1
                assert fast == slow, f.name
        fast, slow = _walk_both(data, tmp_path / "f.dcm")
        assert fast == slow, f.name
    assert parsed > 150


def test_damaged_copies_are_left_to_pydicom_or_read_alike(tmp_path):
    """Truncated, shortened and bit-flipped copies: the parse declines them or agrees with pydicom."""
    warnings.simplefilter("ignore")
    rng = random.Random(17)
    bases = [f for f in _corpus_files() if f.read_bytes()[128:132] == b"DICM" and f.stat().st_size < 400_000]
    for f in rng.sample(bases, 40):
        data = f.read_bytes()
        for _ in range(6):
            cut = bytearray(data[:rng.randrange(132, len(data))] if rng.random() < 0.5 else data)
            for _ in range(rng.randrange(0, 4)):
                at = rng.randrange(132, len(cut))
                cut[at] = rng.randrange(256)
            damaged = bytes(cut)
            fast, slow = _header_both(damaged, tmp_path / "d.dcm", True)
            assert fast is None or fast == slow, f.name
            fast, slow = _walk_both(damaged, tmp_path / "d.dcm")
            assert fast == slow, f.name
