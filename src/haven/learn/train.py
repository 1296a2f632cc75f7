"""Train: transfer learning from a pretrained backbone on the Zarr shards.

Schedule: a new head; ``freeze_epochs`` epochs with the backbone frozen (head only), then
the whole backbone (or its last N stages) unfrozen with a smaller, discriminative learning
rate.  AdamW, linear warmup then cosine decay, label smoothing, class-weighted loss, AMP
(bf16, or fp16 with a gradient scaler) and channels_last on GPU.  A checkpoint (model, optimizer,
scheduler, scaler, RNG states, history) is written atomically after every epoch; a new run
resumes from it.

Several GPUs: started under ``torchrun`` (``haven train`` re-launches itself so when the job sees
more than one GPU), every rank trains a DistributedDataParallel replica on its own share of the
Zarr chunks (the same seeded chunk order on every rank, dealt round-robin); rank 0 validates,
checkpoints and writes the outputs.  The same code runs on CPUs with the gloo backend.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from haven.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# data
class ZarrSplit:
    """A split written by the preprocess stage, read chunk by chunk (whole Zarr chunks)."""

    def __init__(self, store: str | Path):
        import zarr

        self.store = Path(store)
        self.group = zarr.open_group(self.store, mode="r")
        self.images = self.group["images"]
        self.labels = np.asarray(self.group["labels"][:], dtype=np.int64)
        attrs = dict(self.group.attrs)
        self.classes: list[str] = list(attrs["classes"])
        self.mean = torch.tensor(attrs.get("mean", [0.5] * self.images.shape[1]), dtype=torch.float32)
        self.std = torch.tensor(attrs.get("std", [0.25] * self.images.shape[1]), dtype=torch.float32)
        self.chunk = self.images.chunks[0]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def column(self, name: str) -> np.ndarray:
        return np.array([str(v) for v in self.group[name][:].tolist()], dtype=str)

    def _read_group(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([self.images[s:s + self.chunk] for s in starts])
        y = np.concatenate([self.labels[s:s + self.chunk] for s in starts])
        return x, y

    def batches(self, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None,
                buffer_chunks: int = 8, prefetch: int = 2, balanced: bool = False,
                pin_memory: bool = False, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels) batches, reading whole Zarr chunks.

        With ``shuffle`` the chunk order is permuted and samples are shuffled inside a buffer
        of ``buffer_chunks`` chunks; ``prefetch`` buffers are read ahead by background threads
        (Blosc decompression releases the GIL).  ``balanced`` resamples each buffer with
        probabilities inversely proportional to class frequency (a balanced sampler).
        ``shard=(rank, world)`` keeps every world-th chunk of the (shuffled) chunk order, from
        ``rank`` on: the ranks of a data-parallel run read disjoint chunks.
        """
        from concurrent.futures import ThreadPoolExecutor

        n = len(self)
        starts = np.arange(0, n, self.chunk)
        if shuffle:
            starts = rng.permutation(starts)
        rank, world = shard
        starts = starts[rank::world]
        groups = [starts[g:g + buffer_chunks] for g in range(0, len(starts), buffer_chunks)]
        if balanced:
            counts = np.bincount(self.labels, minlength=len(self.classes)).astype(np.float64)
            class_weight = 1.0 / np.maximum(counts, 1)
        with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
            pending = [pool.submit(self._read_group, g) for g in groups[:prefetch + 1]]
            for i in range(len(groups)):
                x, y = pending[i].result()
                if i + prefetch + 1 < len(groups):
                    pending.append(pool.submit(self._read_group, groups[i + prefetch + 1]))
                pending[i] = None  # release the buffer once consumed
                if balanced and shuffle:
                    w = class_weight[y]
                    order = rng.choice(len(x), size=len(x), replace=True, p=w / w.sum())
                else:
                    order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
                for b in range(0, len(x), batch_size):
                    idx = order[b:b + batch_size]
                    xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
                    if pin_memory:
                        xb, yb = xb.pin_memory(), yb.pin_memory()
                    yield xb, yb


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) → float, normalized with the train split's statistics (on device)."""
    x = x.float().div_(255.0)
    return (x - mean.view(1, -1, 1, 1).to(x.device)) / std.view(1, -1, 1, 1).to(x.device)


def augment(x: torch.Tensor, aug: dict, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random augmentation of a float batch, on its own device, in one pass.

    Flips, rotation (degrees), isotropic scale range and translation (fraction of the side)
    become one affine grid per sample (``affine_grid``/``grid_sample``), then per-sample
    brightness/contrast jitter.  ``strength`` scales every magnitude (0 turns augmentation
    off), so one tunable knob sets how hard the project augments.
    """
    if not aug or strength <= 0:
        return x
    n, dev = x.shape[0], x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    angle = (rand(n) * 2 - 1) * math.radians(aug.get("rotate", 0.0)) * strength
    lo, hi = aug.get("scale", [1.0, 1.0])
    scale = 1 + ((lo - 1) + rand(n) * (hi - lo)) * strength
    shift = (rand(n, 2) * 2 - 1) * 2 * aug.get("translate", 0.0) * strength
    flip_x = torch.where(rand(n) < (0.5 if aug.get("hflip") else 0.0), -1.0, 1.0).to(dev)
    flip_y = torch.where(rand(n) < (0.5 if aug.get("vflip") else 0.0), -1.0, 1.0).to(dev)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip_x, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos * flip_y, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, c = aug.get("brightness", 0.0) * strength, aug.get("contrast", 0.0) * strength
    if b or c:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        gain = (1 + (rand(n, 1, 1, 1) * 2 - 1) * c).to(out.dtype)
        bias = ((rand(n, 1, 1, 1) * 2 - 1) * b).to(out.dtype)
        out = (out - mean) * gain + mean + bias
    return out


# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def distributed() -> tuple[int, int]:
    """``(rank, world_size)``: joins the process group when started by torchrun (NCCL on GPUs,
    gloo on CPUs), else ``(0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _all_sum(values: list[float], world: int, dev: torch.device) -> list[float]:
    if world <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def _broadcast_flag(flag: bool, world: int, dev: torch.device) -> bool:
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=dev if dev.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def _autocast(dev: torch.device, amp: str):
    enabled = dev.type == "cuda" and amp in ("bf16", "fp16")
    return torch.autocast(dev.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16, enabled=enabled)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = counts.sum() / np.maximum(counts, 1) / n_classes
    return torch.tensor(weights, dtype=torch.float32)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


@torch.no_grad()
def predict(model: nn.Module, split: ZarrSplit, batch_size: int = 128, amp: str = "bf16"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels for a whole split, in stored order."""
    dev = next(model.parameters()).device
    model.eval()
    probs, labels = [], []
    for x, y in split.batches(batch_size, shuffle=False):
        x = normalize(x.to(dev, non_blocking=True), split.mean, split.std)
        with _autocast(dev, amp):
            logits = model(x)
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(y.numpy())
    if not probs:
        return np.zeros((0, len(split.classes))), np.zeros(0, dtype=np.int64)
    return np.concatenate(probs), np.concatenate(labels)


def val_metrics(model: nn.Module, split: ZarrSplit, amp: str = "bf16") -> dict:
    from sklearn.metrics import balanced_accuracy_score

    probs, y = predict(model, split, amp=amp)
    if len(y) == 0:
        return {}
    pred = probs.argmax(1)
    nll = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return {"val_loss": nll, "val_accuracy": float((pred == y).mean()),
            "val_balanced_accuracy": float(balanced_accuracy_score(y, pred))}


# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    history: list[dict]
    best_epoch: int
    best_metric: float
    model: nn.Module
    resumed_from: int


def _hparams(train: dict, overrides: dict | None) -> dict:
    hp = dict(train)
    hp.update(overrides or {})
    return hp


def _checkpoint_state(model, optimizer, scheduler, scaler, epoch, history, best, hp) -> bytes:
    buf = io.BytesIO()
    torch.save({
        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history, "best": best,
        "hparams": hp,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }, buf)
    return buf.getvalue()


def fit(train_store: str | Path, val_store: str | Path, model_cfg: dict, train_cfg: dict,
        workdir: str | Path, seed: int = 42, overrides: dict | None = None,
        report: Callable[[dict], None] | None = None, max_epochs: int | None = None) -> Result:
    """Train with the transfer-learning schedule; resume from ``workdir/checkpoints/last.pt``.

    ``overrides`` (from the tuner's best config) replace keys of ``train_cfg`` and
    ``model_cfg["backbone"]``; ``report`` is called with the metrics of every epoch.
    """
    from haven.learn.models import backbone_and_head, build_model, freeze_bn_stats, set_backbone_trainable

    hp = _hparams(train_cfg, overrides)
    backbone = (overrides or {}).get("backbone", model_cfg["backbone"])
    epochs = int(max_epochs or hp["epochs"])
    workdir = Path(workdir)
    ckpt_path = workdir / "checkpoints" / "last.pt"
    rank, world = distributed()
    torch.set_num_threads(max(1, int(hp.get("threads", 2)) // world))  # the job's CPUs, shared by the ranks
    seed_everything(seed)

    train, val = ZarrSplit(train_store), ZarrSplit(val_store)
    n_classes = len(train.classes)
    dev = device()
    amp = hp.get("amp", "bf16")
    model = build_model(backbone, n_classes, weights=model_cfg.get("weights"), in_chans=train.channels)
    model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    backbone_params, head_params = backbone_and_head(model)
    groups = [{"params": head_params, "lr": hp["lr"]},
              {"params": backbone_params, "lr": hp["lr"] * hp["backbone_lr_factor"]}]
    if hp.get("optimizer", "adamw") == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=hp["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=hp["weight_decay"])
    batch_size = int(hp["batch_size"])  # per rank
    steps_per_epoch = max(1, math.ceil(len(train) / (batch_size * world)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(epochs * steps_per_epoch, int(hp["warmup_epochs"] * steps_per_epoch)))
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and amp == "fp16")
    balance = hp.get("balance", "loss")
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights(train.labels, n_classes).to(dev) if balance == "loss" else None,
        label_smoothing=hp["label_smoothing"])
    aug_cfg, strength = hp.get("augment") or {}, float(hp.get("augment_strength", 1.0))

    history: list[dict] = []
    best = {"epoch": -1, "metric": -math.inf}
    start = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if state.get("hparams") == hp:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            history, best, start = state["history"], state["best"], state["epoch"] + 1
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(state["rng"]["numpy"])
            random.setstate(state["rng"]["python"])
            log.info("resuming from %s after epoch %d", ckpt_path, state["epoch"])
        else:
            log.warning("ignoring %s: it was written with other hyperparameters", ckpt_path)
    resumed_from = start

    compiled = torch.compile(model) if hp.get("compile") and dev.type == "cuda" else model
    unfreeze = hp.get("unfreeze", "all")
    ddp, ddp_phase = compiled, None
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        frozen = epoch < hp["freeze_epochs"]
        set_backbone_trainable(model, False if frozen else (True if unfreeze == "all" else int(unfreeze)))
        if world > 1 and ddp_phase != frozen:
            # DDP registers the parameters that need gradients when it is built: rebuilt per phase
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(compiled, device_ids=[dev.index] if dev.type == "cuda" else None,
                                          broadcast_buffers=False)
            ddp_phase = frozen
        model.train()
        freeze_bn_stats(model)  # frozen stages keep their pretrained BatchNorm statistics
        total, seen = 0.0, 0
        rng = np.random.default_rng([seed, epoch])  # per-epoch order: a resumed run sees the same batches
        aug_gen = torch.Generator().manual_seed(seed * 1000 + epoch * 997 + rank)
        batches = train.batches(batch_size, shuffle=True, rng=rng, balanced=balance == "sampler",
                                pin_memory=dev.type == "cuda", shard=(rank, world))
        with _join(ddp, world):
            for x, y in batches:
                x = augment(normalize(x.to(dev, non_blocking=True), train.mean, train.std), aug_cfg, strength,
                            aug_gen)
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(dev, non_blocking=True)
                with _autocast(dev, amp):
                    loss = loss_fn(ddp(x), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total += float(loss.detach()) * len(y)
                seen += len(y)
        total, seen = _all_sum([total, float(seen)], world, dev)
        elapsed = time.perf_counter() - t0
        stop = False
        if rank == 0:
            metrics = {"epoch": epoch, "train_loss": total / max(seen, 1), **val_metrics(model, val, amp),
                       "lr": optimizer.param_groups[0]["lr"], "frozen": int(frozen), "samples": int(seen),
                       "seconds": time.perf_counter() - t0, "images_per_s": seen / elapsed}
            history.append(metrics)
            score = metrics.get("val_balanced_accuracy", -metrics["train_loss"])
            if score > best["metric"]:
                best = {"epoch": epoch, "metric": score}
                atomic_write_bytes(workdir / "checkpoints" / "best.pt", _state_dict_bytes(model))
            atomic_write_bytes(ckpt_path, _checkpoint_state(model, optimizer, scheduler, scaler, epoch, history,
                                                            best, hp))
            log.info("epoch %d %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
            if report:
                report(metrics)
            stop = epoch - best["epoch"] >= hp["patience"]
            if stop:
                log.info("early stop: no improvement for %d epochs", hp["patience"])
        if _broadcast_flag(stop, world, dev):
            break

    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written best.pt
    best_path = workdir / "checkpoints" / "best.pt"
    if best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location=dev, weights_only=True))
    return Result(history, best["epoch"], best["metric"], model, resumed_from)


def _join(ddp: nn.Module, world: int):
    """Uneven shards: ranks that run out of batches shadow the others' all-reduces (DDP Join)."""
    if world <= 1:
        import contextlib

        return contextlib.nullcontext()
    from torch.distributed.algorithms.join import Join

    return Join([ddp])


def _state_dict_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def save_model(result: Result, path: str | Path, backbone: str, train_store: str | Path, hp: dict) -> None:
    """The deliverable: best weights plus everything needed to rebuild and feed the model."""
    split = ZarrSplit(train_store)
    buf = io.BytesIO()
    torch.save({
        "state_dict": result.model.state_dict(), "backbone": backbone, "classes": split.classes,
        "in_chans": split.channels, "size": int(split.images.shape[-1]),
        "mean": split.mean.tolist(), "std": split.std.tolist(), "hparams": hp,
        "best_epoch": result.best_epoch,
    }, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    from haven.learn.models import build_model

    meta = torch.load(path, map_location=map_location, weights_only=False)
    model = build_model(meta["backbone"], len(meta["classes"]), weights=None, in_chans=meta["in_chans"])
    model.load_state_dict(meta["state_dict"])
    model.eval()
    return model, meta


def train(preprocess_dir: str | Path, out_dir: str | Path, model_cfg: dict, train_cfg: dict,
          best_config: str | Path | None = None, seed: int = 42, tracking: dict | None = None) -> dict:
    """The train stage: fit with the tuned hyperparameters, save ``model.pt``, ``history.csv``
    and log everything to MLflow."""
    import pandas as pd
    import yaml

    pre, out = Path(preprocess_dir), Path(out_dir)
    overrides = (yaml.safe_load(Path(best_config).read_text()) or {}).get("config", {}) if best_config else {}
    hp = _hparams(train_cfg, overrides)
    backbone = overrides.get("backbone", model_cfg["backbone"])
    result = fit(pre / "train.zarr", pre / "val.zarr", model_cfg, train_cfg, out, seed=seed, overrides=overrides)
    rank, world = distributed()
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
        if rank != 0:  # rank 0 writes the outputs
            return {}
    summary_extra = {"world_size": world}
    save_model(result, out / "model.pt", backbone, pre / "train.zarr", hp)
    (out / "checkpoints" / "last.pt").unlink(missing_ok=True)  # done: a forced re-run starts afresh
    history = pd.DataFrame(result.history)
    history.to_csv(out / "history.csv", index=False)
    summary = {"best_epoch": result.best_epoch, "best_val_balanced_accuracy": result.best_metric,
               "epochs_run": len(result.history), "resumed_from_epoch": result.resumed_from,
               "hparams": hp, "backbone": backbone, **summary_extra}
    if tracking:
        summary["mlflow_run_id"] = _log_run(tracking, summary, history, out, pre)
    atomic_write_text(out / "run.json", json.dumps(summary, indent=2, default=str))
    return summary


def _log_run(tracking: dict, summary: dict, history, out: Path, pre: Path) -> str:
    """The train run: hyperparameters, per-epoch metrics, the model file, the audited data it
    used (``mlflow.log_input``), lineage tags and the link to the tune run."""
    import mlflow

    from haven import track as trk

    tags = trk.lineage_tags("train", tracking["project"], tracking.get("config_hash"), tracking.get("data_hash"))
    if tracking.get("tune_run_id"):
        tags["haven.tune_run_id"] = tracking["tune_run_id"]
    with trk.session(tracking), mlflow.start_run(run_name=f"{tracking['project']}-train", tags=tags) as run:
        mlflow.log_params({**{k: v for k, v in summary["hparams"].items()}, "backbone": summary["backbone"]})
        for row in history.to_dict("records"):
            step = int(row["epoch"])
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=step)
        mlflow.log_metrics({"best_val_balanced_accuracy": summary["best_val_balanced_accuracy"],
                            "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"]})
        trk.log_splits(pre, ("train", "val"))
        mlflow.log_artifact(str(out / "history.csv"))
        mlflow.log_artifact(str(out / "model.pt"), artifact_path="model")
        mlflow.log_artifact(str(pre / "stats.json"), artifact_path="data")
        return run.info.run_id
