"""The training curves (``report/training_curves.png``) from train's ``history.csv``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_history(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(history["epoch"], history["train_loss"], marker="o", label="train loss")
    if "val_loss" in history:
        a.plot(history["epoch"], history["val_loss"], marker="o", label="val loss")
    a.set_xlabel("epoch")
    a.legend()
    for col in ("val_accuracy", "val_balanced_accuracy"):
        if col in history:
            b.plot(history["epoch"], history[col], marker="o", label=col)
    if "frozen" in history and history["frozen"].any():
        last = history.loc[history["frozen"] == 1, "epoch"].max()
        for ax in (a, b):
            ax.axvspan(-0.5, last + 0.5, color="grey", alpha=0.15, label="frozen backbone")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1.02)
    b.legend()
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
