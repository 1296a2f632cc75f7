"""Tune: Ray Tune over the project's search space, ASHA early stopping, Optuna search.

Each trial runs :func:`haven.train.fit` with the sampled hyperparameters and reports the
validation metrics of every epoch; ASHA stops the weak trials early.  The stage writes the
best configuration (``best_config.yaml``, consumed by the train stage), the whole trial
table (``trials.csv``) and a plot of the search, and logs an MLflow parent run with one
child run per trial.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import yaml

from haven.io import atomic_write_text

log = logging.getLogger(__name__)


def search_space(space: dict) -> dict:
    """Config search space → Ray Tune sampling objects."""
    from ray import tune

    out = {}
    for name, p in space.items():
        kind = p["type"]
        if kind == "choice":
            out[name] = tune.choice(p["values"])
        elif kind == "uniform":
            out[name] = tune.uniform(p["low"], p["high"])
        elif kind == "loguniform":
            out[name] = tune.loguniform(p["low"], p["high"])
        elif kind == "randint":
            out[name] = tune.randint(int(p["low"]), int(p["high"]))
        else:  # the schema forbids this; keep the error explicit anyway
            raise ValueError(f"search_space.{name}: unknown type {kind!r}")
    return out


def allocated_cpus() -> int:
    """CPUs this job may use: Slurm's allocation when present, else the process affinity."""
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return len(os.sched_getaffinity(0))


def allocated_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


def _trainable(config: dict, pre: str, model_cfg: dict, train_cfg: dict, seed: int, max_epochs: int) -> None:
    from ray import tune

    from haven.train import fit

    ctx = tune.get_context()
    workdir = ctx.get_trial_dir() if ctx and ctx.get_trial_dir() else tempfile.mkdtemp(prefix="haven-trial-")
    fit(Path(pre) / "train.zarr", Path(pre) / "val.zarr", model_cfg, train_cfg, workdir, seed=seed,
        overrides=config, report=lambda m: tune.report(m), max_epochs=max_epochs)


def run_search(preprocess_dir: str | Path, out_dir: str | Path, model_cfg: dict, train_cfg: dict,
               tune_cfg: dict, seed: int = 42):
    """Run the Ray Tune search and return its ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    out_dir = Path(out_dir).resolve()
    cpus, gpus = allocated_cpus(), allocated_gpus()
    cpt = float(tune_cfg["cpus_per_trial"])
    if not ray.is_initialized():
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024**2, configure_logging=False)
    metric, mode = tune_cfg["metric"], tune_cfg["mode"]
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=tune_cfg["max_epochs"],
                              grace_period=tune_cfg["grace_period"], reduction_factor=tune_cfg["reduction_factor"])
    search_alg = None
    if tune_cfg["search"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=seed)
    trial_train_cfg = dict(train_cfg, threads=max(1, int(cpt)), epochs=tune_cfg["max_epochs"])
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, pre=str(Path(preprocess_dir).resolve()), model_cfg=model_cfg,
                             train_cfg=trial_train_cfg, seed=seed, max_epochs=tune_cfg["max_epochs"]),
        {"cpu": cpt, "gpu": float(tune_cfg["gpus_per_trial"])},
    )
    storage = out_dir / "ray"
    # one folder per search definition: an interrupted search resumes, a changed one starts afresh
    from haven.config import digest

    name = "search-" + digest({"model": model_cfg, "train": train_cfg, "tune": tune_cfg, "seed": seed})
    if tune.Tuner.can_restore(storage / name):
        log.info("resuming the interrupted search in %s", storage / name)
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(tune_cfg["search_space"]),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, search_alg=search_alg,
                                        num_samples=tune_cfg["num_samples"]),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    return tuner.fit()


def plot_search(histories: dict[str, "object"], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for trial, df in histories.items():
        if metric in df:
            ax.plot(df["training_iteration"], df[metric], marker="o", label=trial)
    ax.set_xlabel("epoch (trial budget used)")
    ax.set_ylabel(metric)
    ax.set_title("Hyperparameter search (ASHA stops weak trials early)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tune_project(preprocess_dir: str | Path, out_dir: str | Path, model_cfg: dict, train_cfg: dict,
                 tune_cfg: dict, seed: int = 42, tracking: dict | None = None) -> dict:
    """The tune stage: search, then write best_config.yaml, trials.csv, search.png, run.json."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = run_search(preprocess_dir, out_dir, model_cfg, train_cfg, tune_cfg, seed)
    metric, mode = tune_cfg["metric"], tune_cfg["mode"]
    errors = [r.error for r in grid if r.error]
    ok = [r for r in grid if not r.error and r.metrics and metric in r.metrics]
    if not ok:
        raise RuntimeError(f"every trial failed; first error: {errors[0] if errors else 'no metric reported'}")
    best = grid.get_best_result(metric=metric, mode=mode, scope="all")
    table = grid.get_dataframe(filter_metric=metric, filter_mode=mode)
    keep = [c for c in table.columns if c.startswith("config/") or c in
            (metric, "training_iteration", "trial_id", "val_loss", "val_accuracy", "time_total_s")]
    table = table[keep].rename(columns=lambda c: c.replace("config/", "param_"))
    table.to_csv(out_dir / "trials.csv", index=False)
    histories = {r.metrics.get("trial_id", str(i)): r.metrics_dataframe for i, r in enumerate(grid)
                 if r.metrics_dataframe is not None}
    plot_search(histories, metric, out_dir / "search.png")
    best_value = float(best.metrics_dataframe[metric].max() if mode == "max" else best.metrics_dataframe[metric].min())
    trial_epochs = int(sum(len(df) for df in histories.values()))
    summary = {"config": {k: (v.item() if hasattr(v, "item") else v) for k, v in best.config.items()},
               "metric": metric, "mode": mode, "value": best_value, "trials": len(grid),
               "failed_trials": len(errors), "trial_epochs": trial_epochs}
    if tracking:
        summary["mlflow_run_id"] = _log_search(tracking, summary, grid, histories, out_dir)
    atomic_write_text(out_dir / "best_config.yaml", yaml.safe_dump(summary, sort_keys=False))
    return summary


def _log_search(tracking: dict, summary: dict, grid, histories: dict, out_dir: Path) -> str:
    import mlflow

    from haven import tracking as trk

    trk.setup(tracking["experiment"], tracking["results"], tracking.get("uri"))
    tags = trk.lineage_tags("tune", tracking["project"], tracking.get("config_hash"), tracking.get("data_hash"))
    with mlflow.start_run(run_name=f"{tracking['project']}-tune", tags=tags) as parent:
        mlflow.log_params({f"best_{k}": v for k, v in summary["config"].items()})
        mlflow.log_metrics({f"best_{summary['metric']}": summary["value"], "trial_epochs": summary["trial_epochs"]})
        for result in grid:
            trial_id = (result.metrics or {}).get("trial_id", "unknown")
            with mlflow.start_run(run_name=f"trial-{trial_id}", nested=True,
                                  tags={**tags, "haven.trial_id": trial_id}):
                mlflow.log_params(result.config)
                df = histories.get(trial_id)
                if df is not None:
                    for row in df.to_dict("records"):
                        mlflow.log_metrics({k: float(row[k]) for k in ("val_balanced_accuracy", "val_accuracy",
                                                                       "val_loss", "train_loss") if k in row},
                                           step=int(row["training_iteration"]))
        for name in ("trials.csv", "search.png"):
            mlflow.log_artifact(str(out_dir / name))
        return parent.info.run_id
