"""Evaluate: the trained model on the held-out test split (patients never seen in training).

Writes ``metrics.json`` (accuracy, balanced accuracy, ROC AUC, confusion matrix, per-class
sensitivity/specificity), ``confusion.png`` and ``roc.png``, and logs them to the project's
train run in MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from haven.io import atomic_write_text


def compute_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score

    pred = probs.argmax(1)
    k = len(classes)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    out = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "confusion_matrix": cm.tolist(),
        "classes": classes,
    }
    per_class = {}
    for i, name in enumerate(classes):
        tp, fn = cm[i, i], cm[i].sum() - cm[i, i]
        fp, tn = cm[:, i].sum() - cm[i, i], cm.sum() - cm[i].sum() - cm[:, i].sum() + cm[i, i]
        per_class[name] = {"sensitivity": float(tp / (tp + fn)) if tp + fn else None,
                           "specificity": float(tn / (tn + fp)) if tn + fp else None}
    out["per_class"] = per_class
    present = np.unique(y)
    try:
        if k == 2 and len(present) == 2:
            out["roc_auc"] = float(roc_auc_score(y, probs[:, 1]))
        elif len(present) == k:
            out["roc_auc"] = float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        else:
            out["roc_auc"] = None
    except ValueError:
        out["roc_auc"] = None
    return out


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import ConfusionMatrixDisplay

    disp = ConfusionMatrixDisplay(np.asarray(cm), display_labels=classes)
    disp.plot(colorbar=False)
    disp.figure_.set_size_inches(max(4, 0.5 * len(classes) + 2), max(4, 0.5 * len(classes) + 2))
    disp.ax_.set_title("Confusion matrix (test split)")
    disp.figure_.tight_layout()
    disp.figure_.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(disp.figure_)


def plot_roc(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5, 5))
    targets = [1] if len(classes) == 2 else range(len(classes))
    for i in targets:
        if 0 < (y == i).sum() < len(y):
            RocCurveDisplay.from_predictions(y == i, probs[:, i], name=f"{classes[i]} vs rest", ax=ax,
                                             plot_chance_level=(i == list(targets)[0]))
    ax.set_title("ROC (test split)")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(model_path: str | Path, preprocess_dir: str | Path, out_dir: str | Path,
             tracking: dict | None = None) -> dict:
    from haven.train import ZarrSplit, load_model, predict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_path)
    test = ZarrSplit(Path(preprocess_dir) / "test.zarr")
    probs, y = predict(model, test)
    metrics = compute_metrics(y, probs, meta["classes"])
    metrics["chance_accuracy"] = float(np.bincount(y, minlength=len(meta["classes"])).max() / max(len(y), 1))
    plot_confusion(np.asarray(metrics["confusion_matrix"]), meta["classes"], out / "confusion.png")
    plot_roc(y, probs, meta["classes"], out / "roc.png")
    np.savez_compressed(out / "predictions.npz", probs=probs, labels=y)
    if tracking and tracking.get("train_run_id"):
        _log(tracking, metrics, out)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _log(tracking: dict, metrics: dict, out: Path) -> None:
    import mlflow

    from haven import tracking as trk

    trk.setup(tracking["experiment"], tracking["results"], tracking.get("uri"))
    with mlflow.start_run(run_id=tracking["train_run_id"]):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()
                            if isinstance(v, float) and k != "chance_accuracy"})
        for name in ("confusion.png", "roc.png"):
            mlflow.log_artifact(str(out / name), artifact_path="evaluate")
        mlflow.log_dict(metrics, "evaluate/metrics.json")
