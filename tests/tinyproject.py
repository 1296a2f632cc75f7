"""A tiny trained project for the evaluate tests of every task: a timm ``test_resnet`` trained for
a few steps on 24-px images, saved as train/model.pt, and the evaluate stage run with every output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from haven.trust import evaluate as ev


def train_briefly(images: np.ndarray, targets: np.ndarray, loss_fn, outputs: int, steps: int,
                  mean: float = 0.3, std: float = 0.3):
    """A 1-channel test_resnet with ``outputs`` logits, ``steps`` Adam steps of ``loss_fn`` on the batch."""
    from haven.learn.models import build_model

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread beats two on a busy 2-core machine
    model = build_model("test_resnet", outputs, weights=None, in_chans=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = (torch.from_numpy(images).float() / 255 - mean) / std
    y = torch.from_numpy(targets)
    model.train()
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    return model


def save_model(root: Path, model, classes: list[str], mean=(0.3,), std=(0.3,), **meta) -> Path:
    """root/train/model.pt as the train stage writes it (``meta``: task, task_options, ...)."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    path = root / "train" / "model.pt"
    torch.save({"state_dict": model.state_dict(), "backbone": "test_resnet", "classes": list(classes), "in_chans": 1,
                "size": 24, "mean": list(mean), "std": list(std), "hparams": {}, "best_epoch": 0, **meta}, path)
    return path


def evaluate_all(root: Path, settings: dict, task: str, **kwargs) -> dict:
    """The evaluate stage on root/preprocess/{test,val}.zarr with every output under root/evaluate
    (the file names the rule gives)."""
    out = root / "evaluate"
    outputs = ev.Outputs(metrics=out / "metrics.json", subgroups_table=out / "subgroups.csv",
                         predictions=out / "predictions.npz", explain_maps=out / "explain.npz",
                         plots={kind: out / f"{kind}.png" for kind in ev.PLOT_KINDS})
    return ev.evaluate(root / "train" / "model.pt", root / "preprocess" / "test.zarr", root / "preprocess" / "val.zarr",
                       outputs, settings=settings, task=task, **kwargs)


def assert_every_figure(out: Path) -> None:
    """Every figure the evaluate rule declares is a real PNG (not an empty placeholder)."""
    for kind in ev.PLOT_KINDS:
        data = (out / f"{kind}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, kind
