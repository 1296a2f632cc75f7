"""The evaluate stage's figures (matplotlib, Agg): confusion matrix, ROC, PR, reliability
diagram, subgroup bars, attribution overlays and the robustness curve. Each function draws one
figure into the path it is given; which files exist is the rule's business.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from haven.trust.calibration import expected_calibration_error, reliability_bins


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _plt()
    from sklearn.metrics import ConfusionMatrixDisplay

    disp = ConfusionMatrixDisplay(np.asarray(cm), display_labels=classes)
    disp.plot(colorbar=False)
    disp.figure_.set_size_inches(max(4, 0.5 * len(classes) + 2), max(4, 0.5 * len(classes) + 2))
    disp.ax_.set_title("Confusion matrix (test split)")
    disp.figure_.tight_layout()
    disp.figure_.savefig(path, dpi=100)
    plt.close(disp.figure_)


def _one_vs_rest(classes: list[str], positive: int) -> list[int]:
    return [positive] if len(classes) == 2 else list(range(len(classes)))


def plot_roc(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, positive: int = 1) -> None:
    plt = _plt()
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5, 5))
    targets = _one_vs_rest(classes, positive)
    for i in targets:
        if 0 < (y == i).sum() < len(y):
            RocCurveDisplay.from_predictions(y == i, probs[:, i], name=f"{classes[i]} vs rest", ax=ax,
                                             plot_chance_level=(i == targets[0]))
    ax.set_title("ROC (test split)")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, positive: int = 1) -> None:
    plt = _plt()
    from sklearn.metrics import PrecisionRecallDisplay

    fig, ax = plt.subplots(figsize=(5, 5))
    for i in _one_vs_rest(classes, positive):
        if 0 < (y == i).sum() < len(y):
            PrecisionRecallDisplay.from_predictions(y == i, probs[:, i], name=f"{classes[i]} vs rest", ax=ax)
    ax.set_title("Precision-recall (test split)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(probs: np.ndarray, y: np.ndarray, path: Path, bins: int = 15,
                     scaled: np.ndarray | None = None, temperature: float | None = None) -> None:
    plt = _plt()
    panels = [("uncalibrated", probs)] + ([(f"temperature scaled (T = {temperature:.2f})", scaled)]
                                          if scaled is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, p) in zip(axes[0], panels):
        r = reliability_bins(p, y, bins)
        centers = (r["edges"][:-1] + r["edges"][1:]) / 2
        filled = r["count"] > 0
        width = 1.0 / bins
        ax.bar(centers[filled], r["accuracy"][filled], width=width, edgecolor="k", alpha=0.7, label="accuracy")
        ax.bar(centers[filled], (r["confidence"] - r["accuracy"])[filled], bottom=r["accuracy"][filled], width=width,
               color="tab:red", alpha=0.3, hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}\nECE = {expected_calibration_error(p, y, bins):.3f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability diagram (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_subgroups(audit: dict, path: Path) -> None:
    plt = _plt()
    attrs = audit["attributes"]
    if not attrs:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        reasons = "\n".join(f"{a}: {r}" for a, r in audit["skipped"].items()) or "no attributes configured"
        ax.text(0.5, 0.5, f"Subgroup audit: no attribute to audit\n{reasons}", ha="center", va="center", fontsize=9)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    metrics = [m for m in audit["gap_metrics"]]
    fig, axes = plt.subplots(1, len(attrs), figsize=(max(4.5, 1.1 * max(len(e["groups"]) for e in attrs.values())
                                                         * len(metrics) / 2.5) * len(attrs) / max(1, len(attrs) / 2),
                                                     4.2), squeeze=False)
    for ax, (attr, e) in zip(axes[0], attrs.items()):
        groups = list(e["groups"])
        width = 0.8 / max(1, len(metrics))
        for j, m in enumerate(metrics):
            vals = [e["groups"][g].get(m) for g in groups]
            xs = np.arange(len(groups)) + (j - (len(metrics) - 1) / 2) * width
            label = f"{m} ({audit['positive_class']})" if m in ("sensitivity", "specificity") and \
                audit.get("positive_class") else m
            bars = ax.bar(xs, [np.nan if v is None else v for v in vals], width=width, label=label)
            for b, g, v in zip(bars, groups, vals):
                ax.text(b.get_x() + b.get_width() / 2, (v or 0) + 0.01, "n/a" if v is None else f"{v:.2f}",
                        ha="center", va="bottom", fontsize=5, rotation=90)
                if g not in e["eligible_groups"]:
                    b.set_alpha(0.35)
                    b.set_hatch("..")
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels([f"{g}\nn={e['groups'][g]['n']}" for g in groups], fontsize=7)
        ax.set_ylim(0, 1.15)
        lg = e["largest_gap"]
        flag = " FLAGGED" if e["flagged"] else ""
        ax.set_title(f"{attr}: largest gap {lg['gap']:.2f} ({lg['metric']}){flag}" if lg else f"{attr}: no gap",
                     fontsize=9, color="tab:red" if e["flagged"] else "black")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Subgroup audit (faded: n < {audit['min_group_size']}, not in the gap; "
                 f"threshold {audit['threshold']:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _display_image(img: np.ndarray, mode: str | None) -> tuple[np.ndarray, str | None]:
    """uint8 (C, H, W) → something imshow shows: RGB for rgb data, else the first channel."""
    if img.shape[0] == 3 and mode == "rgb":
        return np.transpose(img, (1, 2, 0)), None
    return img[0], "gray"


def plot_attributions(images: np.ndarray, maps: np.ndarray, examples: list[tuple[int, bool]], y: np.ndarray,
                      pred: np.ndarray, classes: list[str], title: str, path: Path, per_class: int,
                      mode: str | None = None, signed: bool = False) -> None:
    """One row per class, ``per_class`` correct then ``per_class`` wrong examples as overlays."""
    plt = _plt()
    rows = [c for c in range(len(classes)) if (y == c).any()]
    cols = 2 * per_class
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.7 * cols, 2.0 * len(rows) + 0.7), squeeze=False,
                             layout="constrained")
    pos = {c: {True: [], False: []} for c in rows}
    for j, (i, correct) in enumerate(examples):
        pos[int(y[i])][correct].append(j)
    for r, c in enumerate(rows):
        slots = pos[c][True][:per_class] + [None] * (per_class - len(pos[c][True][:per_class])) + \
            pos[c][False][:per_class] + [None] * (per_class - len(pos[c][False][:per_class]))
        for k, (ax, j) in enumerate(zip(axes[r], slots)):
            ax.set_xticks([])
            ax.set_yticks([])
            if j is None:
                ax.text(0.5, 0.5, "none correct" if k < per_class else "none wrong", ha="center", va="center",
                        fontsize=6, transform=ax.transAxes)
                for s in ax.spines.values():
                    s.set_visible(False)
                continue
            i = examples[j][0]
            shown, cmap = _display_image(images[j], mode)
            ax.imshow(shown, cmap=cmap)
            m = maps[j]
            if signed:
                m = np.maximum(m, 0)  # Grad-CAM: positive evidence for the explained class
            scale = (m.max() if signed else np.percentile(m, 99.5)) if m.max() > 0 else 1.0
            m = np.clip(m / (scale or 1.0), 0, 1)
            rgba = plt.get_cmap("jet")(m)
            rgba[..., 3] = 0.7 * m  # transparent where the map is 0: the image stays readable
            ax.imshow(rgba)
            ok = pred[i] == y[i]
            ax.set_title(f"✓ {classes[y[i]]}" if ok else f"✗ {classes[y[i]]}\n→ {classes[pred[i]]}",
                         fontsize=7, color="black" if ok else "tab:red")
        axes[r][0].set_ylabel(classes[c], fontsize=8)
    fig.suptitle(f"{title}: {per_class} correct | {per_class} wrong per class\n(explaining the predicted class)",
                 fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_robustness(rob: dict, path: Path, pixel_scale: float | None = None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    eps = rob["epsilons"]
    for attack, marker, label in (("fgsm", "o", "FGSM"), ("pgd", "s", f"PGD ({rob['pgd_steps']} steps)")):
        acc = np.array(rob[attack], dtype=float)
        ci = rob.get(f"{attack}_ci") or [None] * len(eps)
        lo = np.array([acc[i] - c[0] if c else 0 for i, c in enumerate(ci)])
        hi = np.array([c[1] - acc[i] if c else 0 for i, c in enumerate(ci)])
        ax.errorbar(eps, acc, yerr=[lo, hi], marker=marker, capsize=3, label=label)
    if rob.get("chance") is not None:
        ax.axhline(rob["chance"], color="grey", ls=":", label="chance (majority class)")
    ax.set_xlabel("epsilon (L-inf, normalized pixel units)")
    ax.set_ylabel(f"accuracy (n = {rob['n']})")
    ax.set_ylim(0, 1.02)
    if pixel_scale:
        sec = ax.secondary_xaxis("top", functions=(lambda e: e * pixel_scale * 255, lambda v: v / pixel_scale / 255))
        sec.set_xlabel("epsilon in 8-bit grey levels (x std x 255)", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("Adversarial robustness (test subsample)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
