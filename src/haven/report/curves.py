"""The training curves (``report/training_curves.png``) from train's ``history.csv``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_history(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    # a cross-validated model's history has one run per fold (column `fold`): a line per fold
    runs = history.groupby("fold") if "fold" in history else [(None, history)]
    for fold, h in runs:
        tag = "" if fold is None else f" (fold {fold})"
        a.plot(h["epoch"], h["train_loss"], marker="o", label=f"train loss{tag}")
        if "val_loss" in h:
            a.plot(h["epoch"], h["val_loss"], marker="o", label=f"val loss{tag}")
        for col in ("val_accuracy", "val_balanced_accuracy", "val_macro_roc_auc", "val_qwk"):
            if col in h:
                b.plot(h["epoch"], h[col], marker="o", label=f"{col}{tag}")
    a.set_xlabel("epoch")
    a.legend(fontsize="small")
    if "frozen" in history and history["frozen"].any():
        last = history.loc[history["frozen"] == 1, "epoch"].max()
        for ax in (a, b):
            ax.axvspan(-0.5, last + 0.5, color="grey", alpha=0.15, label="frozen backbone")
    b.set_xlabel("epoch")
    b.set_ylim(min(0.0, float(b.get_ylim()[0])), 1.02)  # kappa can be negative
    b.legend(fontsize="small")
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
