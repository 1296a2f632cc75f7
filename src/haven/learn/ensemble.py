"""The cross-validated model: the fold models of a project as one ensemble ``model.pt``.

Rule ``train_fold`` trains one network per fold (:mod:`haven.learn.folds`: trained on the other
folds, early-stopped on its own); this stage puts them together.  The ensemble's ``model.pt`` holds
every member's weights and the record a single model has (classes, input, mean/std, task, the
tuned hyperparameters), so everything downstream (evaluate, export, register, the model package,
predict, serve) loads it with :func:`haven.learn.checkpoint.load_model` like a single network; its
outputs are the members' averaged probabilities (:class:`haven.learn.models.Ensemble`).

``run.json`` carries the cross-validation figures: each fold's best validation metric, their mean
and standard deviation.  In MLflow the ensemble is a parent run (the one evaluate adds the test
metrics to and register registers) whose children are the fold runs.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from haven.io import atomic_write_bytes, atomic_write_text


@dataclass
class EnsembleFiles:
    """What the stage reads (every fold's model.pt, run.json, history.csv, in fold order; the
    folds table) and writes (the ensemble's model.pt, history.csv, run.json)."""

    models: list[Path]
    runs: list[Path]
    histories: list[Path]
    folds: Path
    model: Path
    history: Path
    run: Path


def member_record(models: list[Path]) -> dict:
    """model.pt of the ensemble: the first fold's record with every fold's weights."""
    metas = [torch.load(p, map_location="cpu", weights_only=False) for p in models]
    first = metas[0]
    for p, m in zip(models[1:], metas[1:]):
        for key in ("backbone", "classes", "in_chans", "size", "mean", "std", "task", "pixels"):
            if m.get(key) != first.get(key):
                raise ValueError(f"{p}: its {key} differs from {models[0]}'s; the folds of one project must be "
                                 f"trained with the same settings (re-run the train_fold jobs)")
    record = {k: v for k, v in first.items() if k not in ("state_dict", "best_epoch")}
    record["members"] = [m["state_dict"] for m in metas]
    record["member_best_epochs"] = [m["best_epoch"] for m in metas]
    record["best_epoch"] = None
    return record


def cv_summary(runs: list[dict], metric: str) -> dict:
    """The fold runs' best validation metric per fold, mean and standard deviation."""
    values = [float(r[f"best_{metric}"]) for r in runs]
    return {"folds": len(runs), "metric": metric, "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_fold": [{"fold": k, "best_epoch": r["best_epoch"], f"best_{metric}": v, "epochs_run": r["epochs_run"],
                          "mlflow_run_id": r.get("mlflow_run_id")} for k, (r, v) in enumerate(zip(runs, values))]}


def assemble(files: EnsembleFiles, task, tracking: dict | None = None) -> dict:
    """Write the ensemble's model.pt, history.csv (every fold's epochs, column ``fold``) and
    run.json; log the parent run with the folds as its children."""
    import io

    if len(files.models) < 2 or not len(files.models) == len(files.runs) == len(files.histories):
        raise ValueError("an ensemble needs a model.pt, run.json and history.csv per fold, at least two folds")
    buf = io.BytesIO()
    torch.save(member_record(files.models), buf)
    atomic_write_bytes(files.model, buf.getvalue())
    history = pd.concat([pd.read_csv(h).assign(fold=k) for k, h in enumerate(files.histories)], ignore_index=True)
    history = history[["fold", *[c for c in history.columns if c != "fold"]]]
    atomic_write_text(files.history, history.to_csv(index=False))
    runs = [json.loads(Path(r).read_text()) for r in files.runs]
    cv = cv_summary(runs, task.val_metric)
    summary = {"best_epoch": None, f"best_{task.val_metric}": cv["mean"], "epochs_run": int(len(history)),
               "hparams": runs[0]["hparams"], "backbone": runs[0]["backbone"], "cv": cv}
    if tracking:
        summary["mlflow_run_id"] = _log_parent(tracking, summary, task.val_metric, files)
    atomic_write_text(files.run, json.dumps(summary, indent=2, default=str))
    return summary


def _log_parent(tracking: dict, summary: dict, metric: str, files: EnsembleFiles) -> str:
    """The ensemble's run (params, the folds' mean and sd, the model) and the fold runs made its
    children (``mlflow.parentRunId``: MLflow's UI nests them under it)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from haven import track as trk

    cv = summary["cv"]
    tags = trk.lineage_tags("ensemble", tracking["project"], tracking.get("config_hash"), tracking.get("data_hash"))
    with trk.session(tracking), mlflow.start_run(run_name=f"{tracking['project']}-cv", tags=tags) as run:
        fold_runs = [f["mlflow_run_id"] for f in cv["per_fold"] if f.get("mlflow_run_id")]
        client = MlflowClient()
        tune = next((client.get_run(r).data.tags.get("haven.tune_run_id") for r in fold_runs[:1]), None)
        if tune:
            mlflow.set_tag("haven.tune_run_id", tune)
        mlflow.log_params({**summary["hparams"], "backbone": summary["backbone"], "cv_folds": cv["folds"]})
        mlflow.log_metrics({f"cv_{metric}_mean": cv["mean"], f"cv_{metric}_sd": cv["sd"], f"best_{metric}": cv["mean"],
                            **{f"fold{f['fold']}_best_{metric}": f[f"best_{metric}"] for f in cv["per_fold"]}})
        for child in fold_runs:
            client.set_tag(child, "mlflow.parentRunId", run.info.run_id)
        mlflow.log_artifact(str(files.history))
        mlflow.log_artifact(str(files.folds), artifact_path="data")
        mlflow.log_artifact(str(files.model), artifact_path="model")
        return run.info.run_id
