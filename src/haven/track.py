"""MLflow tracking: one experiment per project, lineage tags on every run, the model registry.

By default the store is embedded under ``<results>/mlflow`` (a sqlite database and an
artifact folder, nothing to start; open it with
``mlflow ui --backend-store-uri sqlite:///results/mlflow/mlflow.db``).  When the config's
``tracking_uri`` is an http(s) URL, everything (runs, artifacts, registered models) goes to
that server instead.

Runs per project experiment: the tune run (parent) with one child run per trial, the train
run (tagged ``haven.tune_run_id``; the evaluate stage logs the test metrics into it), and
the registered model ``<registry_prefix><project>`` whose versions point at the train runs'
logged models, carry the test metrics and a link to the project's report.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

#: the metrics the model registry and `haven compare` show, in this order
TEST_METRICS = ("test_accuracy", "test_balanced_accuracy", "test_roc_auc")
SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "testing"}


def default_uri(results: str | os.PathLike) -> str:
    return f"sqlite:///{(Path(results) / 'mlflow' / 'mlflow.db').resolve()}"


def is_remote(uri: str | None) -> bool:
    return bool(uri) and uri.split(":", 1)[0] in ("http", "https", "databricks")


@contextlib.contextmanager
def _store_lock(results: Path, uri: str | None = None):
    """Serialise writers of an embedded store (sqlite schema migrations and writes race when
    two jobs start together); a tracking server serialises by itself."""
    if is_remote(uri):
        yield
        return
    lock = Path(results) / "mlflow" / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _setup(experiment: str, results: Path, uri: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        kwargs = {}
        if not is_remote(uri):
            kwargs["artifact_location"] = (results / "mlflow" / "artifacts").resolve().as_uri()
        try:
            exp_id = mlflow.create_experiment(experiment, **kwargs)
        except MlflowException:  # created meanwhile by another job talking to the same server
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def setup(experiment: str, results: str | os.PathLike, uri: str | None = None) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    results = Path(results)
    uri = uri or default_uri(results)
    with _store_lock(results, uri):
        return _setup(experiment, results, uri)


@contextlib.contextmanager
def session(tracking: dict):
    """``setup`` and hold the store's lock for the whole block (embedded store only)."""
    results = Path(tracking["results"])
    uri = tracking.get("uri") or default_uri(results)
    with _store_lock(results, uri):
        yield _setup(tracking["experiment"], results, uri)


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    """git in haven's own source tree (the code that ran), whatever the working directory."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True,
                             cwd=_REPO if (_REPO / ".git").exists() else None)
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
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for env, tag in (("SLURM_JOB_ID", "haven.slurm_job_id"), ("SLURM_JOB_NUM_NODES", "haven.slurm_nodes"),
                     ("HAVEN_RULE", "haven.snakemake_rule"), ("HAVEN_WILDCARDS", "haven.snakemake_wildcards")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def log_splits(table: str | os.PathLike | None, stats: str | os.PathLike | None, project: str,
               splits: tuple[str, ...] = ("train", "val"), context: str | None = None) -> int:
    """``mlflow.log_input`` the audited data the run used: one dataset per split (named
    ``<project>-<split>``), made from the preprocess stage's pseudonymous ``splits.csv`` (``table``:
    file, patient pseudonym, label, split) and tagged with the audited manifest's hash from its
    ``stats.json``.  Only the schema, a profile and a digest go to MLflow, never the images.
    Returns the number of datasets logged (none without the table)."""
    import mlflow
    import pandas as pd

    if table is None or not Path(table).is_file():
        return 0
    table = Path(table)
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    stats = json.loads(Path(stats).read_text()) if stats is not None and Path(stats).is_file() else {}
    n = 0
    for split in splits:
        part = df[df["split"] == split].reset_index(drop=True)
        if part.empty:
            continue
        with warnings.catch_warnings():  # mlflow registers its local-file source twice and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            ds = mlflow.data.from_pandas(part, source=str(table.resolve()), name=f"{project}-{split}",
                                         targets="label")
        tags = {"split": split}
        if stats.get("data_manifest_hash"):
            tags["haven.data_manifest_hash"] = stats["data_manifest_hash"]
        mlflow.log_input(ds, context=context or SPLIT_CONTEXT.get(split, split), tags=tags)
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# model registry
def _numeric(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class RegisterFiles:
    """What the register stage reads: the model, the train run, its test metrics, and (when
    exported) the ONNX graph with its parity record (``haven export-onnx``); ``report`` is where the
    project's page will be, linked from the version but not read (the report stage comes after
    register, so that the page can show the registered model's predictions on new data, and logs
    itself to the train run: :func:`log_report`)."""

    model: Path
    run: Path
    metrics: Path
    report: Path
    onnx: Path | None = None
    onnx_report: Path | None = None

    @classmethod
    def in_results(cls, project_dir: str | os.PathLike) -> "RegisterFiles":
        """The files where the rules put them under a project's results folder (by hand, tests)."""
        d = Path(project_dir)
        return cls(d / "train" / "model.pt", d / "train" / "run.json", d / "evaluate" / "metrics.json",
                   d / "report" / "index.html", d / "train" / "model.onnx",
                   d / "train" / "onnx.json")


def register_model(files: RegisterFiles, tracking: dict, name: str,
                   metric: str = "test_balanced_accuracy", alias: str = "champion", *, log_model) -> dict:
    """Register the project's final model (the train run's ``model.pt`` with evaluate's
    calibration and decision rule, as the pyfunc package of :mod:`haven.predict.pyfunc`: input
    DICOM/PNG/JPEG files, the training run's preprocessing inside) as a new version of ``name``:
    version tags and description carry the test metrics, the lineage and a link to the project's
    report (also logged as an artifact of the train run, as are the ONNX graph and its parity
    record when ``files`` has them).  ``log_model(model_pt, metrics_json, name=, version=, params=)``
    logs the package into the active run and returns its ModelInfo: the caller passes
    :func:`haven.predict.pyfunc.log_package` (this module sits below the stages and never imports
    them; the package's code decodes files through the preprocess stage, which imports this).
    The alias ``alias`` points at the version with the best ``metric`` so far.  Returns what
    ``registered.json`` holds."""
    import mlflow
    from mlflow import MlflowClient

    from haven.learn.checkpoint import load_model

    run_id = json.loads(Path(files.run).read_text()).get("mlflow_run_id")
    if not run_id:
        raise ValueError(f"{files.run} names no MLflow run (was tracking off?)")
    evaluated = json.loads(Path(files.metrics).read_text())
    test = {f"test_{k}": v for k, v in _numeric(evaluated).items() if k not in ("n", "chance_accuracy")}
    report = Path(files.report)
    _, meta = load_model(files.model)
    if metric not in test:  # best_metric is another task's (a segmentation has no balanced accuracy)
        from haven.learn.tasks import get_task

        metric = f"test_{get_task(meta.get('task', 'classification'), meta.get('task_options')).test_metric}"

    with session(tracking):
        client = MlflowClient()
        train_run = client.get_run(run_id)
        with mlflow.start_run(run_id=run_id):
            for path in (files.onnx, files.onnx_report):
                if path is not None and Path(path).is_file():
                    mlflow.log_artifact(str(path), artifact_path="onnx")
            report_artifact = mlflow.get_artifact_uri("report/index.html")
            # the rows it answers say the train run until the registry version exists
            info = log_model(files.model, files.metrics, name=name, version=f"run {run_id}",
                             params=meta.get("hparams"))
            if test:
                mlflow.log_metrics(test, model_id=info.model_id)
        lineage = {k: v for k, v in train_run.data.tags.items()
                   if k in ("haven.config_hash", "haven.data_manifest_hash", "haven.git_commit", "haven.git_dirty",
                            "haven.tune_run_id")}
        report_link = report.resolve().as_uri()  # written after register, at this place (log_report)
        tags = {**{k: f"{v:.6g}" for k, v in test.items()}, **lineage, "haven.project": tracking["project"],
                "haven.train_run_id": run_id, "report": report_link, "report_artifact": report_artifact,
                "backbone": meta["backbone"]}
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        description = _version_description(tracking["project"], meta, test, report_link, report_artifact, run_id,
                                           lineage)
        client.update_model_version(name, version.version, description=description)
        if not client.get_registered_model(name).description:
            client.update_registered_model(
                name, description=f"haven: the final model of project {tracking['project']} (one version per "
                                  f"pipeline run; alias `{alias}` = best {metric}).")
        champion = _champion(client, name, metric)
        if champion is not None:
            client.set_registered_model_alias(name, alias, champion)
    return {"name": name, "version": int(version.version), "model_uri": info.model_uri,
            "registry_uri": f"models:/{name}/{version.version}", "alias": alias,
            "champion_version": int(champion) if champion is not None else None, "train_run_id": run_id,
            "tune_run_id": lineage.get("haven.tune_run_id"), "metrics": test, "report": report_link,
            "report_artifact": report_artifact, "tracking_uri": mlflow.get_tracking_uri()}


def log_report(tracking: dict, run_json: str | os.PathLike, paths: list[str | os.PathLike]) -> None:
    """Log the project's report page and model card (``paths``) to its train run under ``report/``
    (the registered version links there: :func:`register_model`)."""
    import mlflow

    run_id = json.loads(Path(run_json).read_text()).get("mlflow_run_id")
    if not run_id:
        return
    with session(tracking), mlflow.start_run(run_id=run_id):
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path="report")


def _version_description(project: str, meta: dict, test: dict, report_link: str, report_artifact: str,
                         run_id: str, lineage: dict) -> str:
    """The model version's description: what it classifies, its test metrics and where it came from."""
    classes = meta["classes"]
    lines = [f"**{project}**: {meta['backbone']} for {len(classes)} classes "
             f"({', '.join(map(str, classes[:12]))}{' ...' if len(classes) > 12 else ''}).", "",
             "| test metric | value |", "|---|---|"]
    lines += [f"| {k[5:]} | {v:.4f} |" for k, v in test.items()]
    lines += ["", f"Report: [{report_link or 'index.html'}]({report_link}) · in MLflow: `{report_artifact}`",
              f"Train run `{run_id}`, tune run `{lineage.get('haven.tune_run_id', '')}`, "
              f"commit `{lineage.get('haven.git_commit', '')}`, "
              f"audited data `{lineage.get('haven.data_manifest_hash', '')}`."]
    return "\n".join(lines)


def _champion(client, name: str, metric: str) -> str | None:
    """The version with the best ``metric`` tag (the newest on ties)."""
    best, best_value = None, None
    for v in client.search_model_versions(f"name='{name}'"):
        try:
            value = float(v.tags.get(metric, "nan"))
        except ValueError:
            continue
        if value != value:
            continue
        if best_value is None or value > best_value or (value == best_value and int(v.version) > int(best)):
            best, best_value = v.version, value
    return best


# ---------------------------------------------------------------------------------------------
# project comparison
def compare(projects: dict[str, str], results: str | os.PathLike, uri: str | None = None,
            metric: str = "test_balanced_accuracy", registry_prefix: str = "haven-"):
    """Each project's best train run (by ``metric``; among the runs on the project's current
    audited data, ``<results>/<project>/preprocess/stats.json``, when there are any), its
    hyperparameters and metrics side by side: a DataFrame with one row per project.
    ``projects`` maps project → experiment."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    uri = uri or default_uri(results)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    rows = []
    for project, experiment in projects.items():
        row = {"project": project, "experiment": experiment}
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else [
            r for r in client.search_runs([exp.experiment_id], filter_string="tags.`haven.stage` = 'train'",
                                          max_results=1000)
            if r.info.status == "FINISHED"]
        if not runs:
            rows.append(row)
            continue
        # runs on the project's current audited data when there are any (older data: older runs)
        stats = Path(results) / project / "preprocess" / "stats.json"
        current = json.loads(stats.read_text()).get("data_manifest_hash") if stats.is_file() else None
        on_current = [r for r in runs if current and r.data.tags.get("haven.data_manifest_hash") == current]
        runs = on_current or runs

        def key(r):
            value = r.data.metrics.get(metric)
            return (value is not None, value if value is not None else 0.0, r.info.start_time)

        best = max(runs, key=key)
        p, m, t = best.data.params, best.data.metrics, best.data.tags
        row.update(run_id=best.info.run_id, run_name=best.info.run_name, runs=len(runs),
                   started=pd.Timestamp(best.info.start_time, unit="ms").isoformat(timespec="seconds"),
                   backbone=p.get("backbone"))
        for k in ("lr", "backbone_lr_factor", "batch_size", "weight_decay", "unfreeze", "freeze_epochs",
                  "augment_strength", "epochs"):
            row[k] = p.get(k)
        row["best_val_balanced_accuracy"] = m.get("best_val_balanced_accuracy")
        for k in TEST_METRICS:
            row[k] = m.get(k)
        tune_id = t.get("haven.tune_run_id")
        row["tune_run_id"] = tune_id
        if tune_id:
            try:
                tune = client.get_run(tune_id)
                row["tune_trials"] = tune.data.params.get("trials")
                row["tune_trial_epochs"] = tune.data.metrics.get("trial_epochs")
            except Exception:  # noqa: BLE001 - a deleted tune run only loses two columns
                pass
        versions = client.search_model_versions(f"name='{registry_prefix}{project}'")
        mine = [v for v in versions if v.run_id == best.info.run_id]
        if mine:
            row["registered_model"] = f"{registry_prefix}{project}"
            row["model_version"] = max(int(v.version) for v in mine)
        row["git_commit"] = (t.get("haven.git_commit") or "")[:12]
        row["data_manifest_hash"] = t.get("haven.data_manifest_hash")
        row["config_hash"] = t.get("haven.config_hash")
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("runs", "tune_trials", "tune_trial_epochs", "model_version"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    return df


def format_comparison(df) -> str:
    """The comparison as a text table with the projects side by side (one column each)."""
    if df.empty:
        return "(no projects)"
    show = df.set_index("project").drop(columns=["experiment"], errors="ignore")
    def fmt(v):
        if v is None or (isinstance(v, float) and v != v):
            return "–"
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() else f"{v:.4f}"
        return v

    show = show.astype(object).where(show.notna(), None).map(fmt)
    return show.T.to_string()
