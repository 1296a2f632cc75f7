"""Shards: ingest and anonymize as several jobs give what one job gives, whatever the shard count."""

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest

from haven import demo, shards
from deidrun import anonymize_into, audit_of, merge_into
from haven.ingest import ingest, merge_ingest

KEY = b"k" * 32


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    demo.make_brain_ct(root / "src", n_patients=12, slices=3, seed=1)
    source = root / "src" / "dicom"
    # the same instance twice, in (very likely) another shard: a copy must be quarantined once
    first = sorted(source.rglob("*.dcm"))[0]
    shutil.copy(first, source / "zz-copy.dcm")
    return root, source, root / "src" / "labels.csv"


def _sharded(root: Path, source: Path, labels: Path, n: int) -> Path:
    out = root / f"n{n}"
    for i in range(n):
        ingest(source, out / "ingest" / "shards" / str(i), labels=labels, label_key="accession", shard=(i, n))
    merge_ingest([out / "ingest" / "shards" / str(i) for i in range(n)], out / "ingest")
    for i in range(n):
        anonymize_into(source, out / "ingest", out / "anonymize" / "shards" / str(i), KEY, shard=(i, n),
                       data=out / "anonymize" / "data" / str(i))
    merge_into([out / "anonymize" / "shards" / str(i) for i in range(n)], out / "anonymize")
    return out


def test_shards_partition_the_files_stably():
    paths = [f"p{i}/s/{j}.dcm" for i in range(50) for j in range(4)]
    got = [shards.shard_of(p, 7) for p in paths]
    assert got == [shards.shard_of(p, 7) for p in paths]  # stable
    assert set(got) == set(range(7))
    assert all(shards.shard_of(p, 1) == 0 for p in paths)
    assert shards.parse_shard("3/8") == (3, 8)
    with pytest.raises(ValueError, match="I/N"):
        shards.parse_shard("3")
    with pytest.raises(ValueError, match="0 <= I < N"):
        shards.parse_shard("8/8")


def test_shard_count_from_files_per_shard(tmp_path):
    for i in range(25):
        (tmp_path / f"{i}.dcm").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    assert shards.count_files(tmp_path) == 25
    assert shards.shard_count({"source": str(tmp_path), "files_per_shard": 10}) == 3
    assert shards.shard_count({"source": str(tmp_path), "files_per_shard": 10, "shards": 5}) == 5
    assert shards.shard_count({"source": str(tmp_path / "not-yet"), "files_per_shard": 10}) == 1


def test_any_shard_count_gives_the_same_result(cohort):
    root, source, labels = cohort
    one, three = _sharded(root, source, labels, 1), _sharded(root, source, labels, 3)
    for name in ("manifest.csv", "quarantine.csv"):
        assert (one / "ingest" / name).read_bytes() == (three / "ingest" / name).read_bytes(), name
    q = pd.read_csv(three / "ingest" / "quarantine.csv")
    assert q["reason"].str.startswith("duplicate: same SOPInstanceUID").sum() == 1
    ids = [set(pd.read_csv(d / "ingest" / "identifiers.csv", dtype=str).itertuples(index=False)) for d in (one, three)]
    assert ids[0] == ids[1]
    # the same de-identified bytes under the same names, only the shard folder differs
    a, b = _files(one / "anonymize" / "data"), _files(three / "anonymize" / "data")
    strip = lambda files: {k.split("/", 1)[1]: v for k, v in files.items()}  # noqa: E731
    segs = len(list(source.rglob("seg.dcm")))  # the hemorrhage series' DICOM-SEGs are de-identified too
    assert segs > 0 and len(a) == 36 + segs and strip(a) == strip(b)
    assert len({k.split("/")[0] for k in b}) == 3
    ma, mb = (pd.read_csv(d / "anonymize" / "manifest.csv", dtype=str) for d in (one, three))
    assert ma.drop(columns="file").equals(mb.drop(columns="file"))
    assert [f.split("/", 1)[1] for f in ma["file"]] == [f.split("/", 1)[1] for f in mb["file"]]
    log = pd.read_csv(three / "anonymize" / "anonymization.log.csv", dtype=str)
    assert log["input_index"].astype(int).tolist() == list(range(len(log)))
    assert set(log["output"].dropna()) == set(mb["file"])
    # and the gate holds on the sharded layout
    result = audit_of(three / "anonymize", three / "ingest")
    assert result["passed"] and result["files"] == 36 + len(list(source.rglob("seg.dcm"))), result["findings"][:5]


def test_merge_names_a_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="re-run the ingest shard"):
        merge_ingest([tmp_path / "0"], tmp_path / "out")
