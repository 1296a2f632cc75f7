"""Faults: kill -9 in the middle of ingest, anonymize, preprocess, tune and train; rerun the DAG.

One small project (the brain-ct demo, 2 shards, 32 px, short search and training) runs through
Snakemake, and each of the five stages is killed with SIGKILL (its whole process tree: Dask and
Ray workers too, as a Slurm time limit or a dead node would) once it is under way.  After each
kill Snakemake is run again.  Then: nothing half-written is left, the data stages equal an
uninterrupted run byte for byte, the search resumed instead of starting over, and the trained
weights equal an uninterrupted training from the same search result (seeded, on CPU).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

PROJECT = "brain-ct"
TARGET = f"results/{PROJECT}/train/model.pt"


def small_config(root: Path) -> dict:
    conf = yaml.safe_load((root / "config.yaml").read_text())
    p = conf["projects"][PROJECT]
    conf["projects"] = {PROJECT: p}
    p["shards"] = 2
    p["preprocess"]["size"] = 32
    p["train"].update(epochs=3, freeze_epochs=1)
    p["tune"].update(num_samples=2, max_epochs=2)
    return conf


def snakemake(root: Path, work: Path, *targets: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", *targets, "-s", str(root / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", "2", "--rerun-incomplete"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _procs() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, [a.decode(errors="replace") for a in argv if a])
    return out


def _stage_process(stage: str) -> int | None:
    for pid, (_, argv) in _procs().items():
        if any(Path(a).name == "haven" for a in argv[:2]) and stage in argv[1:3]:
            return pid
    return None


def _kill_tree(pid: int) -> None:
    procs = _procs()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, (ppid, _) in procs.items() if ppid == p]
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_and_kill(root: Path, work: Path, stage: str, under_way, timeout: float = 900) -> str:
    """Run the DAG; SIGKILL `haven <stage>` (and its children) once ``under_way()`` is true."""
    proc = snakemake(root, work, TARGET)
    t0, killed = time.monotonic(), False
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        pid = _stage_process(stage)
        if pid and not killed and under_way():
            _kill_tree(pid)
            killed = True
        time.sleep(0.05)
    log = proc.communicate(timeout=60)[0]
    assert killed, f"{stage} was never seen running:\n{log[-3000:]}"
    assert proc.returncode != 0, f"the DAG finished although {stage} was killed:\n{log[-3000:]}"
    return log


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".snakemake_timestamp"}


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    conf = small_config(root)
    ref = tmp_path_factory.mktemp("uninterrupted")
    (ref / "config.yaml").write_text(yaml.safe_dump(conf))
    r = snakemake(root, ref, f"results/{PROJECT}/preprocess/stats.json")
    log = r.communicate(timeout=900)[0]
    assert r.returncode == 0, log[-4000:]

    work = tmp_path_factory.mktemp("killed")
    (work / "config.yaml").write_text(yaml.safe_dump(conf))
    shutil.copytree(ref / ".secrets", work / ".secrets")  # the same key (the demo makes a random one)
    res = work / "results" / PROJECT
    started = {}

    def after(seconds, stage):
        def check():
            started.setdefault(stage, time.monotonic())
            return time.monotonic() - started[stage] >= seconds
        return check

    kills = [
        ("ingest", after(0.5, "ingest")),
        ("anonymize", lambda: len(list((res / "anonymize" / "data").rglob("*.dcm"))) >= 10),
        ("preprocess", lambda: (res / "preprocess" / "train.zarr").exists()),
        ("tune", lambda: any((res / "tune" / "ray").rglob("checkpoint_000000"))),
        ("train", lambda: (res / "train" / "checkpoints" / "last.pt").is_file()),
    ]
    logs = {stage: run_and_kill(root, work, stage, under_way) for stage, under_way in kills}
    final = snakemake(root, work, TARGET)
    log = final.communicate(timeout=900)[0]
    assert final.returncode == 0, log[-4000:]
    return {"ref": ref, "work": work, "logs": logs, "conf": conf}


def test_nothing_half_written_is_left(runs):
    res = runs["work"] / "results"
    leftovers = [p for p in res.rglob("*") if p.is_file() and (p.name.endswith((".tmp", ".part"))
                                                              or p.name.startswith(".tmp-"))]
    assert not leftovers, leftovers[:10]


def test_data_stages_equal_an_uninterrupted_run(runs):
    a, b = runs["ref"] / "results" / PROJECT, runs["work"] / "results" / PROJECT
    for stage in ("ingest", "anonymize", "preprocess"):
        da, db = _digest(a / stage), _digest(b / stage)
        da = {k: v for k, v in da.items() if not k.startswith("audit")}
        db = {k: v for k, v in db.items() if not k.startswith("audit")}
        assert da == db, (stage, sorted(set(da.items()) ^ set(db.items()))[:6])


def test_search_resumed_and_finished(runs):
    best = yaml.safe_load((runs["work"] / "results" / PROJECT / "tune" / "best_config.yaml").read_text())
    assert best["resumed"] is True
    assert best["trials"] == runs["conf"]["projects"][PROJECT]["tune"]["num_samples"] and best["failed_trials"] == 0


def test_resumed_training_equals_an_uninterrupted_one(root, runs, tmp_path):
    import torch

    work = runs["work"]
    res = work / "results" / PROJECT
    clean = tmp_path / "train"
    pre = res / "preprocess"
    run = subprocess.run([sys.executable, "-m", "haven.cli", "train", "--train", str(pre / "train.zarr"),
                          "--val", str(pre / "val.zarr"), "--stats", str(pre / "stats.json"),
                          "--splits", str(pre / "splits.csv"), "--model", str(clean / "model.pt"),
                          "--history", str(clean / "history.csv"), "--summary", str(clean / "run.json"),
                          "--best-config", str(res / "tune" / "best_config.yaml"), "--config",
                          str(work / "config.yaml"), "--project", PROJECT], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = yaml.safe_load((res / "train" / "run.json").read_text())
    assert resumed["resumed_from_epoch"] >= 1  # it did continue from its checkpoint
    a = torch.load(res / "train" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(clean / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
