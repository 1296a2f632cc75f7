"""Tune: Ray Tune over the project's search space, ASHA early stopping, Optuna search.

Each trial runs :func:`haven.learn.train.fit` with the sampled hyperparameters and reports the
validation metrics of every epoch with ``ray.tune.report``, together with a Tune checkpoint
(the trainer's ``last.pt``), so that ASHA can stop weak trials early and an interrupted search
resumes every unfinished trial from its last epoch (``Tuner.restore``).  The stage writes the
best configuration (``best_config.yaml``, consumed by the train stage), the trial table
(``trials.csv``, one row per trial), the per-epoch history of every trial (``history.csv``)
and a plot of the search (``search.png``), and logs an MLflow parent run with one child run
per trial.

Resources: Ray gets exactly what the job was given: the CPUs Snakemake/Slurm allotted
(``--cpus``, ``SLURM_CPUS_PER_TASK``, the process's CPU affinity, whichever is smallest) and
the GPUs in ``CUDA_VISIBLE_DEVICES``.  Every trial asks for ``cpus_per_trial`` CPUs and
``gpus_per_trial`` GPUs (fractions share a GPU between small models).  In a Slurm job that
spans several nodes, :func:`haven.learn.launch.slurm_multinode_command` starts Ray on every node
with ``ray symmetric-run`` and runs this same stage against that cluster (``--ray-address``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from haven.io import atomic_write_text
from haven.learn.launch import allocated_cpus, allocated_gpus

log = logging.getLogger(__name__)

#: search-space keys: the train hyperparameters a trial may override, plus the backbone
TUNABLE = ("lr", "backbone_lr_factor", "batch_size", "weight_decay", "unfreeze", "freeze_epochs",
           "label_smoothing", "warmup_epochs", "augment_strength", "optimizer", "balance", "backbone",
           "ordinal_method")
#: tune settings that say where and how fast the search runs, not what it searches
#: (left out of the search's identity: a search resumes on a bigger or smaller allocation)
EXECUTION_KEYS = ("cpus", "gpus", "nodes", "cpus_per_trial", "gpus_per_trial", "max_concurrent_trials",
                  "max_failures", "keep_checkpoints")
HISTORY_METRICS = ("val_balanced_accuracy", "val_accuracy", "val_macro_roc_auc", "val_qwk", "val_loss", "train_loss")


# ---------------------------------------------------------------------------------------------
# search space and resources
def search_space(space: dict) -> dict:
    """Config search space → Ray Tune sampling objects."""
    from ray import tune

    out = {}
    for name, p in space.items():
        if name not in TUNABLE:  # the schema forbids this; keep the error explicit anyway
            raise ValueError(f"search_space.{name}: not a tunable hyperparameter (one of {', '.join(TUNABLE)})")
        kind = p["type"]
        if kind == "choice":
            if not p.get("values"):
                raise ValueError(f"search_space.{name}: choice needs a non-empty `values` list")
            out[name] = tune.choice(p["values"])
            continue
        if "low" not in p or "high" not in p or not p["low"] < p["high"]:
            raise ValueError(f"search_space.{name}: {kind} needs `low` < `high`")
        if kind == "uniform":
            out[name] = tune.uniform(p["low"], p["high"])
        elif kind == "loguniform":
            if p["low"] <= 0:
                raise ValueError(f"search_space.{name}: loguniform needs `low` > 0")
            out[name] = tune.loguniform(p["low"], p["high"])
        elif kind == "randint":  # integers low..high, both included
            out[name] = tune.randint(int(p["low"]), int(p["high"]) + 1)
        else:
            raise ValueError(f"search_space.{name}: unknown type {kind!r}")
    return out


def check_resources(tune_cfg: dict, cluster: dict) -> None:
    """Fail early (instead of Ray waiting forever) when no trial fits the cluster."""
    cpt, gpt = float(tune_cfg["cpus_per_trial"]), float(tune_cfg["gpus_per_trial"])
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if cpt > cpus:
        raise ValueError(f"tune.cpus_per_trial = {cpt:g} but Ray has {cpus:g} CPU(s) "
                         "(raise tune.cpus / the Slurm allocation, or lower cpus_per_trial)")
    if gpt > gpus:
        raise ValueError(f"tune.gpus_per_trial = {gpt:g} but Ray has {gpus:g} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); ask Slurm for "
                         "GPUs (tune.gpus, or the profile's `gpu` resource) or set gpus_per_trial: 0")


def _init_ray(address: str | None, cpus: int | None) -> dict:
    import ray

    if not ray.is_initialized():
        if address:  # an existing cluster (multi-node: started by `ray symmetric-run`)
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:  # a private single-node cluster holding exactly this job's CPUs and GPUs
            # address="local": never attach to some other Ray instance running on this node
            ray.init(address="local", num_cpus=allocated_cpus(cpus), num_gpus=allocated_gpus(),
                     include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2,
                     configure_logging=False)
    return dict(ray.cluster_resources())


# ---------------------------------------------------------------------------------------------
# the trial
def _trainable(config: dict, train_store: str, val_store: str, model_cfg: dict, train_cfg: dict, task,
               seed: int, max_epochs: int) -> None:
    from ray import tune

    from haven.learn.checkpoint import last_path
    from haven.learn.train import fit

    # the trainer's own files (last.pt, best.pt) stay in node-local scratch: Ray would otherwise
    # copy everything in the trial folder into the storage as "artifacts"
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id() if ctx else None
    scratch = Path(tempfile.gettempdir())
    if trial_id:  # the scratch of an earlier attempt of this trial that was killed (kill -9, node loss)
        for stale in scratch.glob(f"haven-trial-{trial_id}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"haven-trial-{trial_id or 'x'}-", dir=scratch))
    try:
        last = last_path(workdir)
        restored = tune.get_checkpoint()
        if restored is not None:  # Tuner.restore / a retried trial: continue after its last epoch
            with restored.as_directory() as d:
                if (Path(d) / "last.pt").is_file():
                    last.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(d) / "last.pt", last)
                else:
                    log.warning("trial %s: its checkpoint holds no last.pt; the trial starts over", trial_id)
        export = workdir / "tune-checkpoint"

        def report(metrics: dict) -> None:
            # the trainer has just written last.pt atomically: hand a snapshot of it to Tune,
            # which copies it into the trial's folder in the (shared) storage before returning
            if export.exists():
                shutil.rmtree(export)
            export.mkdir(parents=True)
            try:
                os.link(last, export / "last.pt")
            except OSError:
                shutil.copyfile(last, export / "last.pt")
            # training_iteration is the trainer's own epoch count, not Ray's count of reports
            # (restored from the checkpoint's metrics; after a kill -9 it was once seen one ahead of
            # the epochs the model had trained): ASHA's rungs and the tables count epochs trained
            tune.report({**metrics, "training_iteration": int(metrics["epoch"]) + 1, "reported_at": time.time()},
                        checkpoint=tune.Checkpoint.from_directory(str(export)))

        fit(train_store, val_store, model_cfg, train_cfg, workdir, seed=seed, overrides=config, report=report,
            max_epochs=max_epochs, task=task)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _progress_callback():
    from ray import tune

    class Progress(tune.Callback):
        """One log line per trial epoch and per finished trial (the rule's log file)."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            log.info("trial %s epoch %s: %s", trial.trial_id, result.get("training_iteration"),
                     {k: round(float(result[k]), 4) for k in HISTORY_METRICS if k in result})

        def on_trial_complete(self, iteration, trials, trial, **info):
            log.info("trial %s finished after %s epoch(s)", trial.trial_id,
                     (trial.last_result or {}).get("training_iteration"))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s failed", trial.trial_id)

    return Progress()


# ---------------------------------------------------------------------------------------------
# the search
def search_name(model_cfg: dict, train_cfg: dict, tune_cfg: dict, seed: int, data_id: str | None = None) -> str:
    """One storage folder per search definition (and data): an interrupted search resumes, a
    changed one (other space, budget, data ...) starts afresh."""
    from haven.config import digest

    definition = {k: v for k, v in tune_cfg.items() if k not in EXECUTION_KEYS}
    return "search-" + digest({"model": model_cfg, "train": train_cfg, "tune": definition, "seed": seed,
                               "data": data_id})


def make_scheduler(tune_cfg: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tune_cfg["scheduler"] == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=tune_cfg["max_epochs"],
                         grace_period=tune_cfg["grace_period"], reduction_factor=tune_cfg["reduction_factor"])


def make_search_alg(tune_cfg: dict, seed: int):
    if tune_cfg["search"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for this generator: it takes its own limit
    return BasicVariantGenerator(random_state=seed, max_concurrent=int(tune_cfg["max_concurrent_trials"] or 0))


def run_search(train_store: str | Path, val_store: str | Path, stats: str | Path | None, model_cfg: dict,
               train_cfg: dict, tune_cfg: dict, *, task, seed: int, storage: str | Path, cpus: int | None = None,
               ray_address: str | None = None, fresh: bool = False, stopper=None):
    """Run (or resume) the Ray Tune search over the Zarr splits ``train_store``/``val_store``
    (``stats``: the preprocess stats.json, the data's identity in the search's name), keeping the
    search state and the trials' checkpoints under ``storage``; returns ``(ResultGrid, resumed)``."""
    from ray import tune

    from haven.track import file_hash
    # num_to_keep=1 makes Tune snapshot the search state at every trial checkpoint (so the state
    # never names a deleted checkpoint); that is intended here, not a bottleneck worth a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    cluster = _init_ray(ray_address, cpus or tune_cfg["cpus"])
    log.info("Ray cluster: %s", {k: v for k, v in cluster.items() if k in ("CPU", "GPU", "memory")})
    check_resources(tune_cfg, cluster)
    metric, mode = tune_cfg["metric"] or task.val_metric, tune_cfg["mode"]
    cpt, gpt = float(tune_cfg["cpus_per_trial"]), float(tune_cfg["gpus_per_trial"])
    trial_train_cfg = dict(train_cfg, threads=max(1, int(cpt)), epochs=tune_cfg["max_epochs"])
    trainable = tune.with_resources(
        # absolute paths: the trials run in Ray's worker processes, in their own working directories
        tune.with_parameters(_trainable, train_store=str(Path(train_store).resolve()),
                             val_store=str(Path(val_store).resolve()), model_cfg=model_cfg,
                             train_cfg=trial_train_cfg, task=task, seed=seed, max_epochs=tune_cfg["max_epochs"]),
        {"cpu": cpt, "gpu": gpt},
    )
    storage = Path(storage).resolve()
    data_id = file_hash(stats) if stats and Path(stats).is_file() else None
    name = search_name(model_cfg, train_cfg, tune_cfg, seed, data_id)
    path = storage / name
    if fresh and path.exists():
        shutil.rmtree(path)
    resumed = bool(tune.Tuner.can_restore(str(path)))
    if resumed:
        log.info("resuming the interrupted search in %s (finished trials are kept, unfinished ones continue "
                 "from their last checkpoint; --fresh starts over)", path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(tune_cfg["search_space"]),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=make_scheduler(tune_cfg),
                                        search_alg=make_search_alg(tune_cfg, seed),
                                        num_samples=tune_cfg["num_samples"],
                                        max_concurrent_trials=tune_cfg["max_concurrent_trials"]
                                        if tune_cfg["search"] == "optuna" else None),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), verbose=0, stop=stopper,
                callbacks=[_progress_callback()],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=int(tune_cfg["max_failures"]))),
        )
    return tuner.fit(), resumed


# ---------------------------------------------------------------------------------------------
# outputs
def trial_tables(grid, metric: str, mode: str):
    """(trials, history): one row per trial, and one row per trial epoch in the order the
    epochs were reported, with the search's cumulative trial-epochs."""
    import pandas as pd

    rows, epochs = [], []
    for i, r in enumerate(grid):
        df = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        trial_id = (r.metrics or {}).get("trial_id") or (df["trial_id"].iloc[-1] if "trial_id" in df else f"t{i}")
        # training_iteration: the epochs the trial ran (Ray's name; ASHA's cuts are the short ones)
        row = {"trial_id": trial_id, "status": "ERROR" if r.error else "TERMINATED",
               "training_iteration": int(df["training_iteration"].max()) if "training_iteration" in df else 0}
        row.update({f"param_{k}": v for k, v in (r.config or {}).items()})
        if metric in df and len(df):
            values = df[metric]
            row[f"best_{metric}"] = float(values.max() if mode == "max" else values.min())
            row[metric] = float(values.iloc[-1])
        for k in ("val_accuracy", "val_loss"):
            if k in df and len(df):
                row[k] = float(df[k].iloc[-1])
        if "time_total_s" in df and len(df):
            row["time_total_s"] = float(df["time_total_s"].iloc[-1])
        if "iterations_since_restore" in df and len(df):  # > 0: continued from a checkpoint
            last = df.iloc[-1]
            row["resumed_after_epoch"] = int(last["training_iteration"] - last["iterations_since_restore"])
        row["error"] = str(r.error).splitlines()[0][:200] if r.error else ""
        rows.append(row)
        if len(df):
            keep = [c for c in ("training_iteration", *HISTORY_METRICS, "reported_at", "time_total_s") if c in df]
            epochs.append(df[keep].assign(trial_id=trial_id))
    trials = pd.DataFrame(rows)
    history = pd.concat(epochs, ignore_index=True) if epochs else pd.DataFrame(
        columns=["trial_id", "training_iteration", metric])
    # a trial resumed from a checkpoint older than its last report repeats those epochs: keep the last
    history = history.drop_duplicates(["trial_id", "training_iteration"], keep="last")
    order = "reported_at" if "reported_at" in history else "training_iteration"
    history = history.sort_values([order, "training_iteration"], kind="stable").reset_index(drop=True)
    history.insert(0, "trial_epochs", range(1, len(history) + 1))
    if len(trials):
        trials["stopped_early"] = ((trials["training_iteration"] < trials["training_iteration"].max())
                                   & (trials["status"] != "ERROR"))
    return trials, history


def plot_search(history, metric: str, mode: str, path: Path, max_epochs: int | None = None) -> None:
    """Left: each trial's metric per epoch (ASHA's cuts are the short lines).  Right: every
    trial epoch at the search's cumulative trial-epoch count, one colour per trial, and the
    best value so far: what the search had spent when it found what."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    colours = plt.get_cmap("tab20")
    if metric in history and len(history):
        for i, (trial, df) in enumerate(history.groupby("trial_id", sort=False)):
            c = colours(i % 20)
            a.plot(df["training_iteration"], df[metric], marker="o", ms=3, color=c, label=trial)
            b.plot(df["trial_epochs"], df[metric], marker="o", ms=3, color=c)
        best = history[metric].cummax() if mode == "max" else history[metric].cummin()
        b.step(history["trial_epochs"], best, where="post", color="black", lw=1.5, label="best so far")
        b.legend(fontsize=7, loc="lower right" if mode == "max" else "upper right")
    a.set_xlabel("epoch of the trial")
    a.set_ylabel(metric)
    a.set_title("per trial (ASHA stops weak trials early)", fontsize=9)
    if max_epochs:
        a.set_xlim(0.5, max_epochs + 0.5)
    a.legend(fontsize=6, loc="best", ncol=2)
    b.set_xlabel("trial-epochs spent by the search")
    b.set_ylabel(metric)
    b.set_title(f"search budget: {len(history)} trial-epochs", fontsize=9)
    fig.suptitle("Hyperparameter search")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plain(v):
    return v.item() if hasattr(v, "item") else v


@dataclass
class TuneFiles:
    """What the tune stage reads and writes (the rule names every file)."""
    train: Path  # the preprocess stage's Zarr splits
    val: Path
    stats: Path  # preprocess stats.json (the data's identity)
    best: Path  # outputs: best_config.yaml, trials.csv, history.csv, search.png
    trials: Path
    history: Path
    plot: Path
    storage: Path  # Ray's storage: the search state and the trials' checkpoints (shared filesystem)
    splits: Path | None = None  # preprocess splits.csv (logged to MLflow as the search's inputs)


def tune_project(files: TuneFiles, model_cfg: dict, train_cfg: dict, tune_cfg: dict, *, task, seed: int,
                 tracking: dict | None = None, cpus: int | None = None, ray_address: str | None = None,
                 fresh: bool = False) -> dict:
    """The tune stage: search, then write the best configuration, the trial table, the per-epoch
    history and the plot.  ``task``: the project's :class:`haven.learn.tasks.Task` (its loss and
    validation metrics in every trial)."""
    for path in (files.best, files.trials, files.history, files.plot):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    grid, resumed = run_search(files.train, files.val, files.stats, model_cfg, train_cfg, tune_cfg, task=task,
                               seed=seed, storage=files.storage, cpus=cpus, ray_address=ray_address, fresh=fresh)
    metric, mode = tune_cfg["metric"] or task.val_metric, tune_cfg["mode"]
    errors = [r.error for r in grid if r.error]
    ok = [r for r in grid if not r.error and r.metrics and metric in r.metrics]
    if not ok:
        raise RuntimeError(f"every trial failed; first error: {errors[0] if errors else 'no metric reported'}")
    best = grid.get_best_result(metric=metric, mode=mode, scope="all")
    trials, history = trial_tables(grid, metric, mode)
    trials.to_csv(files.trials, index=False)
    history.to_csv(files.history, index=False)
    plot_search(history, metric, mode, Path(files.plot), tune_cfg["max_epochs"])
    best_df = best.metrics_dataframe
    best_value = float(best_df[metric].max() if mode == "max" else best_df[metric].min())
    summary = {"config": {k: _plain(v) for k, v in best.config.items()},
               "metric": metric, "mode": mode, "value": best_value,
               "best_trial": best.metrics.get("trial_id"),
               "best_epoch": int(best_df.loc[best_df[metric].idxmax() if mode == "max" else best_df[metric].idxmin(),
                                             "training_iteration"]),
               "trials": len(grid), "failed_trials": len(errors),
               "trial_epochs": int(len(history)),
               "full_budget_trial_epochs": int(tune_cfg["num_samples"]) * int(tune_cfg["max_epochs"]),
               "scheduler": tune_cfg["scheduler"], "search": tune_cfg["search"],
               "resumed": resumed, "seconds": round(time.perf_counter() - t0, 1)}
    if not errors and not tune_cfg["keep_checkpoints"]:
        _prune_checkpoints(grid)
    if tracking:
        summary["mlflow_run_id"] = _log_search(tracking, summary, trials, history, files)
    atomic_write_text(files.best, yaml.safe_dump(summary, sort_keys=False))
    return summary


def _prune_checkpoints(grid) -> None:
    """A finished search needs no trial checkpoints (they are only for resuming)."""
    for r in grid:
        if r.path and Path(r.path).is_dir():
            for ckpt in Path(r.path).glob("checkpoint_*"):
                shutil.rmtree(ckpt, ignore_errors=True)


def _log_search(tracking: dict, summary: dict, trials, history, files: TuneFiles) -> str:
    """MLflow: a parent run for the search, one child run per trial (logged from the driver
    after the search, so trials never talk to the tracking store)."""
    import mlflow

    from haven import track as trk

    trk.setup(tracking["experiment"], tracking["results"], tracking.get("uri"))
    tags = trk.lineage_tags("tune", tracking["project"], tracking.get("config_hash"), tracking.get("data_hash"))
    metric = summary["metric"]
    with mlflow.start_run(run_name=f"{tracking['project']}-tune", tags=tags) as parent:
        mlflow.log_params({f"best_{k}": v for k, v in summary["config"].items()})
        mlflow.log_params({k: summary[k] for k in ("metric", "mode", "scheduler", "search", "trials")})
        mlflow.log_metrics({f"best_{metric}": summary["value"], "trial_epochs": summary["trial_epochs"],
                            "full_budget_trial_epochs": summary["full_budget_trial_epochs"],
                            "failed_trials": summary["failed_trials"]})
        trk.log_splits(files.splits, files.stats, tracking["project"], context="tuning")
        for row in trials.to_dict("records"):
            trial_id = str(row["trial_id"])
            child_tags = {**tags, "haven.trial_id": trial_id, "haven.trial_status": row["status"],
                          "haven.stopped_early": str(bool(row.get("stopped_early")))}
            with mlflow.start_run(run_name=f"trial-{trial_id}", nested=True, tags=child_tags):
                mlflow.log_params({k[len("param_"):]: v for k, v in row.items() if k.startswith("param_")})
                steps = history[history["trial_id"] == row["trial_id"]]
                for rec in steps.to_dict("records"):
                    mlflow.log_metrics({k: float(rec[k]) for k in HISTORY_METRICS if k in rec and rec[k] == rec[k]},
                                       step=int(rec["training_iteration"]))
                mlflow.log_metric("epochs", row["training_iteration"])
                best_value = row.get(f"best_{metric}")
                if best_value is not None and best_value == best_value:  # not NaN
                    mlflow.log_metric(f"best_{metric}", best_value)
        for path in (files.trials, files.history, files.plot):
            mlflow.log_artifact(str(path))
        mlflow.log_dict(summary, "best_config.yaml")
        return parent.info.run_id
