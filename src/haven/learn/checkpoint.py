"""What training leaves on disk: the per-epoch checkpoint a new run resumes from, the best
weights so far, and the deliverable ``model.pt`` (and loading it back for the later stages).

Kept apart from the training loop so that the stages that only use a trained model (evaluate,
the model registry in :mod:`haven.track`) import this and never the loop.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from haven.io import atomic_write_bytes

log = logging.getLogger(__name__)


def last_path(workdir: str | Path) -> Path:
    """The checkpoint of the last finished epoch (a killed run resumes from it)."""
    return Path(workdir) / "checkpoints" / "last.pt"


def best_path(workdir: str | Path) -> Path:
    """The weights of the best epoch so far."""
    return Path(workdir) / "checkpoints" / "best.pt"


def _bytes(obj) -> bytes:
    # serialised in memory first: the file is then written atomically (a kill never leaves half a file)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_last(workdir: str | Path, model, optimizer, scheduler, scaler, epoch: int, history: list[dict],
               best: dict, hp: dict) -> None:
    """Everything a resumed run needs to continue exactly: weights, optimizer, scheduler, scaler,
    history, the best epoch so far, the hyperparameters and the RNG states."""
    atomic_write_bytes(last_path(workdir), _bytes({
        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history, "best": best,
        "hparams": hp,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }))


def write_best(workdir: str | Path, model: nn.Module) -> None:
    atomic_write_bytes(best_path(workdir), _bytes(model.state_dict()))


def resume(workdir: str | Path, hp: dict, model, optimizer, scheduler, scaler, dev: torch.device
           ) -> tuple[list[dict], dict, int] | None:
    """Restore the last checkpoint into the given objects (and the RNGs) when it was written with
    the same hyperparameters; returns ``(history, best, next epoch)``, or None to start afresh."""
    path = last_path(workdir)
    if not path.is_file():
        return None
    state = torch.load(path, map_location=dev, weights_only=False)
    if state.get("hparams") != hp:
        log.warning("ignoring %s: it was written with other hyperparameters", path)
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    log.info("resuming from %s after epoch %d", path, state["epoch"])
    return state["history"], state["best"], state["epoch"] + 1


def load_best(workdir: str | Path, model: nn.Module, dev: torch.device) -> None:
    """Put the best epoch's weights into ``model`` (when an epoch improved at all)."""
    path = best_path(workdir)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location=dev, weights_only=True))


def save_model(result, path: str | Path, backbone: str, train_store: str | Path, hp: dict, task: str,
               task_options: dict | None = None) -> None:
    """The deliverable: best weights (``result.model``, ``result.best_epoch`` of
    :class:`haven.learn.train.Result`) plus everything needed to rebuild and feed the model: the
    ``task``, the classes, the preprocess settings that made the training samples (``pixels``:
    size, mode, HU windows, slab) and the train split's mean/std, so that prediction reuses
    them exactly (:mod:`haven.predict.bundle`)."""
    from haven.learn.data import ZarrSplit

    split = ZarrSplit(train_store)
    atomic_write_bytes(path, _bytes({
        "state_dict": result.model.state_dict(), "backbone": backbone, "classes": split.classes,
        "in_chans": split.channels, "size": int(split.images.shape[-1]),
        "mean": split.mean.tolist(), "std": split.std.tolist(), "hparams": hp,
        "best_epoch": result.best_epoch, "task": task, "task_options": dict(task_options or {}),
        "pixels": split.group.attrs.get("pixels"), **_volume_meta(split, result.model, hp),
    }))


def _volume_meta(split, model: nn.Module, hp: dict) -> dict:
    """What a 3D model adds to model.pt (nothing for slices): ``dims`` 3 (load_model builds the 3D
    network), ``size`` [D, H, W], the ``spacing`` in mm the volumes were resampled to, and ``patch``,
    the training patch that is the sliding-window roi at inference."""
    from haven.learn.data import store_dims
    from haven.learn.net3d import train_patch

    if store_dims(split) != 3:
        return {}
    return {"dims": 3, "size": [int(s) for s in split.images.shape[-3:]], "spacing": split.group.attrs.get("spacing"),
            "patch": train_patch(model, split, hp)}  # None: a classifier of whole volumes


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """model.pt → (the network in eval mode, its record).  A cross-validated project's model.pt
    (:mod:`haven.learn.ensemble`: ``members``) loads as one :class:`~haven.learn.models.Ensemble`."""
    from haven.learn.models import Ensemble

    from haven.learn.tasks import get_task

    meta = torch.load(path, map_location=map_location, weights_only=False)
    # files written before model.pt recorded its task are single-label classification
    meta.setdefault("task", "classification")
    task = get_task(meta["task"], meta.get("task_options"))
    outputs = task.outputs(list(meta["classes"]), meta.get("hparams"))

    def network(state: dict) -> nn.Module:
        extra = {"dims": 3} if meta.get("dims") == 3 else {}  # a volume model (haven.learn.net3d)
        model = task.network(meta["backbone"], outputs, None, meta["in_chans"], **extra)
        model.load_state_dict(state)
        return model

    model = Ensemble([network(s) for s in meta["members"]], task) if "members" in meta else network(meta["state_dict"])
    model.eval()
    return model, meta
