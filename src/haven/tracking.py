"""MLflow tracking: one experiment per project, lineage tags on every run.

By default the store is embedded under ``<results>/mlflow`` (a sqlite database and an
artifact folder, nothing to start; open it with
``mlflow ui --backend-store-uri sqlite:///results/mlflow/mlflow.db``).  When the config's
``tracking_uri`` is an http(s) URL, everything goes to that server instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import subprocess
from pathlib import Path


def default_uri(results: str | os.PathLike) -> str:
    return f"sqlite:///{(Path(results) / 'mlflow' / 'mlflow.db').resolve()}"


@contextlib.contextmanager
def _store_lock(results: Path):
    """Serialise store creation (sqlite schema migrations race when two jobs start together)."""
    lock = Path(results) / "mlflow" / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def setup(experiment: str, results: str | os.PathLike, uri: str | None = None) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    results = Path(results)
    uri = uri or default_uri(results)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    with _store_lock(results):
        mlflow.set_tracking_uri(uri)
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            kwargs = {}
            if uri.startswith("sqlite:"):
                kwargs["artifact_location"] = (results / "mlflow" / "artifacts").resolve().as_uri()
            exp_id = mlflow.create_experiment(experiment, **kwargs)
        else:
            exp_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def lineage_tags(stage: str, project: str, config_hash: str | None = None, data_hash: str | None = None) -> dict:
    """Tags every haven run carries: what code, config and (audited) data produced it, and where."""
    commit = _git("rev-parse", "HEAD")
    tags = {
        "haven.project": project,
        "haven.stage": stage,
        "haven.config_hash": config_hash or "",
        "haven.data_manifest_hash": data_hash or "",
        "haven.git_commit": commit or "unknown",
        "haven.git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))) if commit else "unknown",
        "haven.host": socket.gethostname(),
    }
    for env, tag in (("SLURM_JOB_ID", "haven.slurm_job_id"), ("HAVEN_RULE", "haven.snakemake_rule"),
                     ("HAVEN_WILDCARDS", "haven.snakemake_wildcards")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags
