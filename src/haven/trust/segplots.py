"""Segmentation overlays for the report (matplotlib, Agg): each case's image with the true mask's
contour and the predicted mask filled (and outlined) over it, one colour pair per foreground class;
:func:`pick_cases` chooses which cases a grid shows (the worst and best by Dice, then a seeded
sample), so the figure shows failures as well as successes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["pick_cases", "plot_attack", "plot_note", "plot_overlays"]

# true contour, predicted fill/contour per foreground class (colour-blind-safe pairs)
_TRUE = ("#00e676", "#ffd600", "#00b0ff", "#ffffff")
_PRED = ("#ff1744", "#d500f9", "#ff9100", "#2979ff")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_cases(dice: np.ndarray, n: int = 8, seed: int = 0) -> list[int]:
    """Up to ``n`` case indices: the worst quarter and best quarter by ``dice`` (per case; NaN
    counts as worst), the rest a seeded sample of the others; in that order, no repeats."""
    dice = np.asarray(dice, dtype=np.float64)
    total = len(dice)
    if total <= n:
        return [int(i) for i in np.argsort(np.nan_to_num(dice, nan=-1.0), kind="stable")]
    order = np.argsort(np.nan_to_num(dice, nan=-1.0), kind="stable")
    q = max(1, n // 4)
    chosen = list(order[:q]) + list(order[::-1][:q])
    rest = np.setdiff1d(np.arange(total), chosen)
    rng = np.random.default_rng(seed)
    chosen += list(rng.choice(rest, size=min(n - len(chosen), len(rest)), replace=False))
    return [int(i) for i in chosen]


def _shown(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    """uint8 (C, H, W) -> what imshow shows: RGB for three channels, else the first channel in gray."""
    if img.ndim == 2:
        return img, "gray"
    if img.shape[0] == 3:
        return np.transpose(img, (1, 2, 0)), None
    return img[0], "gray"


def _overlay(ax, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, k: int) -> None:
    from matplotlib.colors import to_rgba

    shown, cmap = _shown(image)
    ax.imshow(shown, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    for c in range(1, k):
        pc, tc = _PRED[(c - 1) % len(_PRED)], _TRUE[(c - 1) % len(_TRUE)]
        pm = pred == c
        if pm.any():
            fill = np.zeros((*pm.shape, 4))
            fill[pm] = to_rgba(pc, 0.35)
            ax.imshow(fill, interpolation="nearest")
            ax.contour(pm.astype(float), levels=[0.5], colors=[pc], linewidths=0.8)
        tm = truth == c
        if tm.any():
            ax.contour(tm.astype(float), levels=[0.5], colors=[tc], linewidths=1.2, linestyles="solid")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_overlays(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path | str,
                  titles: list[str] | None = None, classes: list[str] | None = None, cols: int = 4,
                  title: str = "segmentation: true contour, predicted fill", panel: tuple[float, float] = (2.2, 2.3)
                  ) -> None:
    """A grid of overlays, one panel per case given (pick them with :func:`pick_cases`).

    ``images`` (N, C, H, W) uint8, ``truth``/``pred`` (N, H, W) integer masks, ``titles`` one per
    case (e.g. ``"Dice 0.82"``), ``classes`` (background first) names the legend's entries;
    ``panel``: a panel's (width, height) in inches (a volume's three mid slices are wide)."""
    images, truth, pred = np.asarray(images), np.asarray(truth), np.asarray(pred)
    if not (len(images) == len(truth) == len(pred)) or truth.shape != pred.shape or truth.shape[1:] != images.shape[-2:]:
        raise ValueError(f"overlays need images (N, C, H, W), truth and pred (N, H, W) of one size; got "
                         f"{images.shape}, {truth.shape}, {pred.shape}")
    plt = _plt()
    n = max(1, len(images))
    k = int(max(truth.max(initial=0), pred.max(initial=0))) + 1 if classes is None else len(classes)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows + 0.6), squeeze=False,
                             layout="constrained")
    for j, ax in enumerate(axes.flat):
        if j >= len(images):
            ax.axis("off")
            continue
        _overlay(ax, images[j], truth[j], pred[j], max(k, 2))
        if titles is not None:
            ax.set_title(str(titles[j]), fontsize=7)
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "no cases", ha="center", va="center", transform=axes.flat[0].transAxes)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = (classes or [str(c) for c in range(max(k, 2))])[1:]
    handles = []
    for c, name in enumerate(names, start=1):
        handles.append(Line2D([], [], color=_TRUE[(c - 1) % len(_TRUE)], lw=1.2, label=f"true {name}"))
        handles.append(Patch(color=_PRED[(c - 1) % len(_PRED)], alpha=0.5, label=f"predicted {name}"))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_note(path: Path | str, title: str, text: str) -> None:
    """A figure that says why a plot the stage declares is not drawn for this task (the report then
    shows the reason where the plot would be, not a gap)."""
    import textwrap

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.2))
    ax.axis("off")
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize=10, weight="bold")
    ax.text(0.5, 0.3, textwrap.fill(text, 80), ha="center", va="center", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_attack(rob: dict, path: Path | str, pixel_scale: float | None = None) -> None:
    """Mean foreground Dice under FGSM and PGD against epsilon (normalized input units), the clean
    Dice and the all-background Dice (what predicting nothing scores) as references."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    eps = rob["epsilons"]
    for attack, marker, label in (("fgsm", "o", "FGSM"), ("pgd", "s", f"PGD ({rob['pgd_steps']} steps)")):
        ax.plot(eps, [np.nan if v is None else v for v in rob[attack]], marker=marker, label=label)
    if rob.get("all_background_dice") is not None:
        ax.axhline(rob["all_background_dice"], color="grey", ls=":", label="predicting all background")
    ax.set_xlabel("epsilon (L-inf, normalized pixel units)")
    ax.set_ylabel(f"mean foreground Dice (n = {rob['n']} images)")
    ax.set_ylim(0, 1.02)
    from haven.trust.plots import grey_level_axis

    grey_level_axis(ax, pixel_scale)
    ax.legend(fontsize=8)
    ax.set_title("Adversarial robustness of the masks (test subsample)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
