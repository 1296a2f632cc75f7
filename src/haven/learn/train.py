"""Train: transfer learning from a pretrained backbone on the Zarr shards.

Schedule: a new head; ``freeze_epochs`` epochs with the backbone frozen (head only), then
the whole backbone (or its last N stages) unfrozen with a smaller, discriminative learning
rate.  AdamW, linear warmup then cosine decay, AMP (bf16, or fp16 with a gradient scaler) and
channels_last on GPU.  A volume store (``dims: 3``) trains a MONAI 3D network from scratch
(:mod:`haven.learn.net3d`: no frozen phase, one learning rate, random patches, 3D augmentation,
sliding-window validation).  The project's task (:mod:`haven.learn.tasks`) gives the head's width, the
loss and the validation metrics.  A checkpoint (model, optimizer, scheduler, scaler, RNG states,
history) is written atomically after every epoch; a new run resumes from it
(:mod:`haven.learn.checkpoint`).

Several GPUs: started under ``torchrun`` (``haven train`` re-launches itself so when the job sees
more than one GPU, :mod:`haven.learn.launch`), every rank trains a DistributedDataParallel
replica on its own share of the Zarr chunks (the same seeded chunk order on every rank, dealt
round-robin); rank 0 validates, checkpoints and writes the outputs.  The same code runs on CPUs
with the gloo backend (:mod:`haven.learn.ddp`).

:func:`fit` is the loop, made of steps a task reuses: :func:`build_optimization`,
:func:`checkpoint.resume <haven.learn.checkpoint.resume>`, :func:`run_epoch`, :func:`validate`,
:func:`keep_checkpoint` and :func:`early_stop`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from haven.io import atomic_write_text
from haven.learn import checkpoint as ckpt
from haven.learn import ddp, infer, net3d
from haven.learn.augment3d import augment_volumes
from haven.learn.data import ZarrSplit, augment, augment_pair, normalize, store_dims
from haven.learn.tasks import Task, get_task

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# settings
def hparams(train_cfg: dict, overrides: dict | None = None) -> dict:
    """The train settings a run uses: ``train_cfg`` updated by ``overrides`` (the tuner's best or
    sampled configuration).  Keys ``train_cfg`` leaves out (a section written by hand, tests) get
    the schema's defaults; a validated section has every key, so nothing is added (the dict, and
    the checkpoint holding it, stay exactly as given)."""
    from haven.config import section_defaults

    hp = dict(train_cfg)
    for key, value in section_defaults("train").items():
        hp.setdefault(key, value)
    hp.update(overrides or {})
    return hp


def _default_task() -> Task:
    """The schema's task, for callers without settings (tests, notebooks)."""
    from haven.config import section_defaults

    return get_task(section_defaults("task"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# the steps of the loop
@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def build_optimization(model: nn.Module, hp: dict, epochs: int, steps_per_epoch: int,
                       dev: torch.device) -> Optimization:
    """Optimizer with two parameter groups (head at ``lr``, backbone at ``lr * backbone_lr_factor``;
    the head first: the logged ``lr`` is its group's), warmup-cosine schedule per step, and the
    gradient scaler (active for fp16 on GPU only)."""
    from haven.learn.models import backbone_and_head

    backbone_params, head_params = backbone_and_head(model)
    # a 3D network has no pretrained backbone to spare (haven.learn.net3d): one learning rate
    factor = 1.0 if _dims(model) == 3 else hp["backbone_lr_factor"]
    groups = [{"params": head_params, "lr": hp["lr"]},
              {"params": backbone_params, "lr": hp["lr"] * factor}]
    if hp["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=hp["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=hp["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(epochs * steps_per_epoch, int(hp["warmup_epochs"] * steps_per_epoch)))
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and hp["amp"] == "fp16")
    return Optimization(optimizer, scheduler, scaler)


def set_phase(model: nn.Module, frozen: bool, unfreeze) -> None:
    """The transfer-learning phase: backbone frozen (head only), or unfrozen (all, or the last N stages)."""
    from haven.learn.models import set_backbone_trainable

    set_backbone_trainable(model, False if frozen else (True if unfreeze == "all" else int(unfreeze)))


def run_epoch(model: nn.Module, step_model: nn.Module, split: ZarrSplit, loss_fn: nn.Module, opt: Optimization,
              hp: dict, seed: int, epoch: int, rank: int, world: int, dev: torch.device) -> tuple[float, int]:
    """One pass over this rank's share of the train split; returns (summed loss, samples).

    ``step_model`` is what the batches go through (``model``, compiled and/or DDP-wrapped).  The
    batch order and the augmentation are seeded per epoch (and rank), so a resumed run sees the
    same batches as an uninterrupted one."""
    from haven.learn.models import freeze_bn_stats

    model.train()
    freeze_bn_stats(model)  # frozen stages keep their pretrained BatchNorm statistics
    total, seen = 0.0, 0
    rng = np.random.default_rng([seed, epoch])
    aug_gen = torch.Generator().manual_seed(seed * 1000 + epoch * 997 + rank)
    batches = split.batches(int(hp["batch_size"]), shuffle=True, rng=rng, balanced=hp["balance"] == "sampler",
                            pin_memory=dev.type == "cuda", shard=(rank, world))
    aug_cfg, strength = hp["augment"], float(hp["augment_strength"])
    volumes, patch = store_dims(split) == 3, net3d.train_patch(model, split, hp)
    with ddp.join(step_model, world):
        for x, y in batches:
            x = normalize(x.to(dev, non_blocking=True), split.mean, split.std)
            y = y.to(dev, non_blocking=True)
            if volumes:  # a random patch of each (foreground-biased for masks; None: whole), augmented in 3D
                masks = y.long() if split.targets == "masks" else None
                x, masks = net3d.random_patches(x, masks, patch, aug_gen)
                x, masks = augment_volumes(x, masks, aug_cfg, strength, aug_gen)
                y = y if masks is None else masks
            elif split.targets == "masks":  # the masks move with their images
                x, y = augment_pair(x, y.long(), aug_cfg, strength, aug_gen)
            else:
                x = augment(x, aug_cfg, strength, aug_gen)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=_memory_format(x.ndim))
            with infer.autocast(dev, hp["amp"]):
                loss = loss_fn(step_model(x), y)
            opt.optimizer.zero_grad(set_to_none=True)
            opt.scaler.scale(loss).backward()
            opt.scaler.step(opt.optimizer)
            opt.scaler.update()
            opt.scheduler.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
    return total, seen


def validate(model: nn.Module, split: ZarrSplit, task: Task, amp: str, hp: dict | None = None) -> dict:
    """The task's validation metrics (``val_*``) of the model on ``split`` (volumes: whole, or by
    sliding windows of the training patch, :func:`haven.learn.net3d.validate3d`; needs ``hp``)."""
    if store_dims(split) == 3:
        return net3d.validate3d(model, split, task, {**(hp or {}), "amp": amp})
    scores, targets = infer.predict(model, split, task, amp)
    return task.val_metrics(targets, scores)


def keep_checkpoint(workdir: Path, model: nn.Module, opt: Optimization, epoch: int, history: list[dict],
                    best: dict, score: float, hp: dict) -> dict:
    """After an epoch: the best weights when ``score`` improved, and the resumable checkpoint
    (written last, so that it never names a best epoch whose weights are not on disk yet);
    returns the best epoch so far."""
    if score > best["metric"]:
        best = {"epoch": epoch, "metric": score}
        ckpt.write_best(workdir, model)
    ckpt.write_last(workdir, model, opt.optimizer, opt.scheduler, opt.scaler, epoch, history, best, hp)
    return best


def early_stop(epoch: int, best: dict, patience: int) -> bool:
    stop = epoch - best["epoch"] >= patience
    if stop:
        log.info("early stop: no improvement for %d epochs", patience)
    return stop


# ---------------------------------------------------------------------------------------------
# the loop
@dataclass
class Result:
    history: list[dict]
    best_epoch: int
    best_metric: float
    model: nn.Module
    resumed_from: int


def _dims(model: nn.Module) -> int:
    return int(getattr(model, "haven_info", {}).get("dims", 2))


def _memory_format(ndim: int) -> torch.memory_format:
    # channels-last for the GPU's convolutions: NHWC for images, NDHWC for volumes
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _build(backbone: str, model_cfg: dict, task: Task, split: ZarrSplit, dev: torch.device,
           hp: dict | None = None) -> nn.Module:
    dims = store_dims(split)
    extra = {"dims": 3} if dims == 3 else {}  # a 2D task's network() need not know about volumes
    model = task.network(backbone, task.outputs(split.classes, hp), model_cfg["weights"], split.channels, **extra)
    model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=_memory_format(dims + 2))
    return model


def fit(train_store: str | Path, val_store: str | Path, model_cfg: dict, train_cfg: dict,
        workdir: str | Path, seed: int, overrides: dict | None = None,
        report: Callable[[dict], None] | None = None, max_epochs: int | None = None,
        task: Task | None = None) -> Result:
    """Train with the transfer-learning schedule; resume from ``workdir/checkpoints/last.pt``.

    ``overrides`` (from the tuner's best config) replace keys of ``train_cfg`` and
    ``model_cfg["backbone"]``; ``report`` is called with the metrics of every epoch; ``task``
    (:func:`haven.learn.tasks.get_task` of the config's ``task``; None: the schema's) gives the
    head's width, the loss and the validation metrics.
    """
    hp = hparams(train_cfg, overrides)
    backbone = (overrides or {}).get("backbone", model_cfg["backbone"])
    task = task or _default_task()
    epochs = int(max_epochs or hp["epochs"])
    workdir = Path(workdir)
    rank, world = ddp.distributed()
    torch.set_num_threads(max(1, int(hp["threads"]) // world))  # the job's CPUs, shared by the ranks
    seed_everything(seed)

    train, val = ZarrSplit(train_store), ZarrSplit(val_store)
    dev = ddp.device()
    model = _build(backbone, model_cfg, task, train, dev, hp)
    steps_per_epoch = max(1, math.ceil(len(train) / (int(hp["batch_size"]) * world)))  # batch_size is per rank
    opt = build_optimization(model, hp, epochs, steps_per_epoch, dev)
    loss_fn = task.loss(train.labels, train.classes, hp).to(dev)

    history: list[dict] = []
    best = {"epoch": -1, "metric": -math.inf}
    start = 0
    restored = ckpt.resume(workdir, hp, model, opt.optimizer, opt.scheduler, opt.scaler, dev)
    if restored:
        history, best, start = restored
    resumed_from = start

    compiled = torch.compile(model) if hp["compile"] and dev.type == "cuda" else model
    step_model, ddp_phase = compiled, None
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        scratch = net3d.from_scratch(train)  # 3D: nothing pretrained, so no frozen phase and no partial unfreeze
        frozen = epoch < hp["freeze_epochs"] and not scratch
        set_phase(model, frozen, "all" if scratch else hp["unfreeze"])
        if world > 1 and ddp_phase != frozen:
            step_model, ddp_phase = ddp.wrap(compiled, dev), frozen
        total, seen = run_epoch(model, step_model, train, loss_fn, opt, hp, seed, epoch, rank, world, dev)
        total, seen = ddp.all_sum([total, float(seen)], world, dev)
        elapsed = time.perf_counter() - t0
        stop = False
        if rank == 0:
            metrics = {"epoch": epoch, "train_loss": total / max(seen, 1), **validate(model, val, task, hp["amp"], hp),
                       "lr": opt.optimizer.param_groups[0]["lr"], "frozen": int(frozen), "samples": int(seen),
                       "seconds": time.perf_counter() - t0, "images_per_s": seen / elapsed}
            history.append(metrics)
            # no validation samples: the train loss decides
            best = keep_checkpoint(workdir, model, opt, epoch, history, best,
                                   metrics.get(task.val_metric, -metrics["train_loss"]), hp)
            log.info("epoch %d %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
            if report:
                report(metrics)
            stop = early_stop(epoch, best, hp["patience"])
        if ddp.broadcast_flag(stop, world, dev):
            break

    ddp.barrier(world)  # rank 0 has written best.pt
    ckpt.load_best(workdir, model, dev)
    return Result(history, best["epoch"], best["metric"], model, resumed_from)


# ---------------------------------------------------------------------------------------------
# the stage
@dataclass
class TrainFiles:
    """What the train stage reads and writes (the rule names every file)."""
    train: Path  # the preprocess stage's Zarr splits
    val: Path
    stats: Path  # preprocess stats.json (the data's identity)
    model: Path  # outputs: model.pt, history.csv, run.json
    history: Path
    run: Path
    workdir: Path  # holds checkpoints/ (last.pt: a killed run resumes; best.pt)
    best_config: Path | None = None  # the tune stage's best_config.yaml
    splits: Path | None = None  # preprocess splits.csv (logged to MLflow as the run's inputs)


def train(files: TrainFiles, model_cfg: dict, train_cfg: dict, *, task: Task, seed: int,
          tracking: dict | None = None) -> dict:
    """The train stage: fit with the tuned hyperparameters, save the model, the history and the
    run summary, and log everything to MLflow."""
    import pandas as pd
    import yaml

    best_config = files.best_config
    overrides = (yaml.safe_load(Path(best_config).read_text()) or {}).get("config", {}) if best_config else {}
    hp = hparams(train_cfg, overrides)
    backbone = overrides.get("backbone", model_cfg["backbone"])
    result = fit(files.train, files.val, model_cfg, train_cfg, files.workdir, seed=seed, overrides=overrides,
                 task=task)
    rank, world = ddp.distributed()
    ddp.finish(world)
    if rank != 0:  # rank 0 writes the outputs
        return {}
    for path in (files.model, files.history, files.run):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    summary_extra = {"world_size": world}
    ckpt.save_model(result, files.model, backbone, files.train, hp, task.name, task.options)
    ckpt.last_path(files.workdir).unlink(missing_ok=True)  # done: a forced re-run starts afresh
    history = pd.DataFrame(result.history)
    history.to_csv(files.history, index=False)
    best_key = f"best_{task.val_metric}"  # best_val_balanced_accuracy for classification
    summary = {"best_epoch": result.best_epoch, best_key: result.best_metric,
               "epochs_run": len(result.history), "resumed_from_epoch": result.resumed_from,
               "hparams": hp, "backbone": backbone, **summary_extra}
    if tracking:
        summary["mlflow_run_id"] = _log_run(tracking, summary, best_key, history, files)
    atomic_write_text(files.run, json.dumps(summary, indent=2, default=str))
    return summary


def _log_run(tracking: dict, summary: dict, best_key: str, history, files: TrainFiles) -> str:
    """The train run: hyperparameters, per-epoch metrics, the model file, the audited data it
    used (``mlflow.log_input``), lineage tags and the link to the tune run."""
    import mlflow

    from haven import track as trk

    tags = trk.lineage_tags("train", tracking["project"], tracking.get("config_hash"), tracking.get("data_hash"))
    if tracking.get("tune_run_id"):
        tags["haven.tune_run_id"] = tracking["tune_run_id"]
    name = f"{tracking['project']}-train"
    if tracking.get("fold") is not None:  # one fold of a cross-validation (the ensemble's run becomes its parent)
        tags["haven.fold"] = str(tracking["fold"])
        name += f"-fold{tracking['fold']}"
    with trk.session(tracking), mlflow.start_run(run_name=name, tags=tags) as run:
        mlflow.log_params({**{k: v for k, v in summary["hparams"].items()}, "backbone": summary["backbone"]})
        for row in history.to_dict("records"):
            step = int(row["epoch"])
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=step)
        mlflow.log_metrics({best_key: summary[best_key], "best_epoch": summary["best_epoch"],
                            "epochs_run": summary["epochs_run"]})
        trk.log_splits(files.splits, files.stats, tracking["project"], ("train", "val"))
        mlflow.log_artifact(str(files.history))
        mlflow.log_artifact(str(files.model), artifact_path="model")
        mlflow.log_artifact(str(files.stats), artifact_path="data")
        return run.info.run_id
