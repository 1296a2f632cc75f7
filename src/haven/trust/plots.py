"""The evaluate stage's figures (matplotlib, Agg): confusion matrix, ROC, PR, reliability
diagram, subgroup bars, attribution overlays and the robustness curve. Each function draws one
figure into the path it is given; which files exist is the rule's business.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from haven.trust.calibration import expected_calibration_error, reliability_bins



def grey_level_axis(ax, pixel_scale: float | None) -> None:
    """A robustness plot's top axis: epsilon (normalized units) as 8-bit grey levels."""
    if pixel_scale:
        sec = ax.secondary_xaxis("top", functions=(lambda e: e * pixel_scale * 255, lambda v: v / pixel_scale / 255))
        sec.set_xlabel("epsilon in 8-bit grey levels (x std x 255)", fontsize=8)

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
                      mode: str | None = None, signed: bool = False, panel_width: float = 1.0) -> None:
    """One row per class, ``per_class`` correct then ``per_class`` wrong examples as overlays
    (``panel_width``: a panel's width relative to a square one's, e.g. 3 mid slices of a volume)."""
    plt = _plt()
    rows = [c for c in range(len(classes)) if (y == c).any()]
    cols = 2 * per_class
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.7 * cols * panel_width, 2.0 * len(rows) + 0.7), squeeze=False,
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
    grey_level_axis(ax, pixel_scale)
    ax.legend(fontsize=8)
    ax.set_title("Adversarial robustness (test subsample)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label_grid(plt, n: int, size: float = 3.0, cols: int = 3):
    """A grid of ``n`` panels (one per finding), the unused ones hidden."""
    c = max(1, min(cols, n))
    r = int(np.ceil(n / c))
    fig, axes = plt.subplots(r, c, figsize=(size * c, size * r + 0.4), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()[:n]


def plot_label_curves(y: np.ndarray, p: np.ndarray, classes: list[str], path: Path, kind: str = "roc") -> None:
    """One ROC (``kind="roc"``) or precision-recall curve per finding of a multi-label model, in one
    figure; a finding without both classes on the test split is named in the legend, not drawn."""
    plt = _plt()
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for j, c in enumerate(classes):
        yj = np.asarray(y)[:, j] == 1
        if not 0 < yj.sum() < len(yj):
            ax.plot([], [], " ", label=f"{c}: one class only on the test split")
        elif kind == "roc":
            RocCurveDisplay.from_predictions(yj, p[:, j], name=c, ax=ax, plot_chance_level=(j == 0))
        else:
            PrecisionRecallDisplay.from_predictions(yj, p[:, j], name=c, ax=ax)
    ax.set_title(("ROC" if kind == "roc" else "Precision-recall") + " per finding (test split)")
    ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_label_reliability(y: np.ndarray, p: np.ndarray, classes: list[str], path: Path, bins: int = 10,
                           scaled: np.ndarray | None = None, ece: dict | None = None) -> None:
    """Per finding: mean predicted P(finding) against the observed fraction with it, in equal-width
    bins, before and (``scaled``) after temperature scaling; ``ece`` {finding: ECE} in the titles."""
    plt = _plt()
    fig, axes = _label_grid(plt, len(classes))
    for j, (ax, c) in enumerate(zip(axes, classes)):
        for probs, name, style in ((p, "model", "o-"), (scaled, "temperature scaled", "s--")):
            if probs is None:
                continue
            idx = np.clip(np.ceil(probs[:, j] * bins).astype(int) - 1, 0, bins - 1)
            count = np.bincount(idx, minlength=bins)
            filled = count > 0
            frac = np.bincount(idx, weights=np.asarray(y)[:, j], minlength=bins)[filled] / count[filled]
            conf = np.bincount(idx, weights=probs[:, j], minlength=bins)[filled] / count[filled]
            ax.plot(conf, frac, style, ms=3, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        e = (ece or {}).get(c)
        ax.set_title(f"{c}" + (f" (ECE {e:.3f})" if e is not None else ""), fontsize=8)
        ax.set_xlabel("predicted P", fontsize=7)
        ax.set_ylabel("observed fraction", fontsize=7)
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("Reliability per finding (test split)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_label_confusion(y: np.ndarray, calls: np.ndarray, classes: list[str], path: Path) -> None:
    """One 2 x 2 confusion matrix per finding (``calls``: the (N, L) yes/no decisions)."""
    plt = _plt()
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    fig, axes = _label_grid(plt, len(classes), size=2.6)
    for j, (ax, c) in enumerate(zip(axes, classes)):
        cm = confusion_matrix(np.asarray(y)[:, j].astype(int), np.asarray(calls)[:, j].astype(int), labels=[0, 1])
        ConfusionMatrixDisplay(cm, display_labels=["no", "yes"]).plot(ax=ax, colorbar=False)
        ax.set_title(c, fontsize=8)
    fig.suptitle("Confusion per finding at its threshold (test split; rows: true)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_label_gradcam(images: np.ndarray, maps: np.ndarray, entries: list[tuple[int, int, bool, float]],
                       classes: list[str], path: Path, per_class: int, mode: str | None = None) -> None:
    """Grad-CAM per finding: one row per finding, ``per_class`` detected then ``per_class`` missed
    test images showing it; ``entries[k]`` = (finding, image index, detected, P) of ``images[k]``."""
    plt = _plt()
    cols = 2 * per_class
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.7 * cols, 1.9 * len(classes) + 0.7), squeeze=False,
                             layout="constrained")
    for r, c in enumerate(classes):
        mine = [k for k, e in enumerate(entries) if e[0] == r]
        slots = [k for k in mine if entries[k][2]][:per_class]
        slots += [None] * (per_class - len(slots))
        missed = [k for k in mine if not entries[k][2]][:per_class]
        slots += missed + [None] * (per_class - len(missed))
        for s, (ax, k) in enumerate(zip(axes[r], slots)):
            ax.set_xticks([])
            ax.set_yticks([])
            if k is None:
                ax.text(0.5, 0.5, "none detected" if s < per_class else "none missed", ha="center", va="center",
                        fontsize=6, transform=ax.transAxes)
                continue
            shown, cmap = _display_image(images[k], mode)
            ax.imshow(shown, cmap=cmap)
            m = np.maximum(maps[k], 0)  # positive evidence for the finding
            m = np.clip(m / (m.max() or 1.0), 0, 1)
            rgba = plt.get_cmap("jet")(m)
            rgba[..., 3] = 0.7 * m
            ax.imshow(rgba)
            ok = entries[k][2]
            ax.set_title(f"{'✓' if ok else '✗'} P = {entries[k][3]:.2f}", fontsize=7,
                         color="black" if ok else "tab:red")
        axes[r][0].set_ylabel(c, fontsize=8)
    fig.suptitle(f"Grad-CAM per finding (its logit):\n{per_class} detected | {per_class} missed\ntest images "
                 "showing it", fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
