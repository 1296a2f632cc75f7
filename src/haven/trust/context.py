"""What every task's evaluation is handed (:class:`Context`) and the small readers they share.

The evaluate stage (:mod:`haven.trust.evaluate`) loads the model and the splits once, then asks
the project's Task to evaluate (``task.evaluate(ctx)``): single-label classification in
:mod:`haven.trust.classify`, multi-label and ordinal beside it.  This module is a leaf: it imports
no evaluation, so each task's evaluation can import it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The figures the stage can draw; where each goes is the caller's (the rule's) choice.
# "overlays" (true vs predicted masks) is segmentation's; the other tasks draw it as a note.
PLOT_KINDS = ("confusion", "roc", "pr", "reliability", "subgroups", "gradcam", "integrated_gradients",
              "robustness", "overlays")


@dataclass
class Outputs:
    """Where the stage writes. Only ``metrics`` is required; a file left None is not written, a
    figure kind left out of ``plots`` is not drawn (neither changes a number in metrics.json)."""

    metrics: Path
    subgroups_table: Path | None = None
    predictions: Path | None = None
    explain_maps: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.plots) - set(PLOT_KINDS))
        if unknown:
            raise ValueError(f"unknown plot {', '.join(unknown)} (known: {', '.join(PLOT_KINDS)})")
        self.metrics = Path(self.metrics)
        for name in ("subgroups_table", "predictions", "explain_maps"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.plots = {k: Path(v) for k, v in self.plots.items()}

    def files(self) -> list[Path]:
        return [p for p in (self.metrics, self.subgroups_table, self.predictions, self.explain_maps,
                            *self.plots.values()) if p is not None]


class Laps:
    """Seconds per phase, for ``metrics["seconds"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def __call__(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self._t0, 2)
        self._t0 = time.perf_counter()


@dataclass
class Context:
    """One evaluation: the loaded model and its record (``meta``: model.pt's dict), the test split,
    the validation split (None when absent or empty), the files to write, the project's
    ``evaluate`` settings, its ``tta`` section, the seed and the phase clock."""

    model: Any
    meta: dict
    task: Any  # haven.learn.tasks.base.Task
    test: Any  # haven.learn.data.ZarrSplit
    val: Any
    outputs: Outputs
    settings: dict
    seed: int = 42
    tta: dict | None = None
    lap: Laps = field(default_factory=Laps)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def predict(self, split) -> tuple[np.ndarray, np.ndarray]:
        """The task's scores and the stored targets of a whole split."""
        from haven.learn.infer import predict

        # amp: autocast only acts on a GPU, and evaluate's model stays on the CPU; a 3D segmentation
        # is read in sliding windows of its training patch (model.pt's "patch"; None otherwise)
        return predict(self.model, split, self.task, amp="bf16", patch=self.meta.get("patch"))


def column(split, name: str) -> np.ndarray:
    """A per-sample string column of a split ('' where the data carried no value)."""
    if name not in split.group:
        return np.full(len(split), "", dtype=object)
    return np.array([str(v) for v in split.group[name][:].tolist()], dtype=object)


def patient_clusters(split) -> np.ndarray | None:
    """The bootstrap's resampling unit: patients when every image names one; otherwise None
    (images: an unknown patient could be anyone's)."""
    patients = column(split, "patient")
    return patients if len(patients) and (patients != "").all() else None


def read(split, idx: np.ndarray) -> np.ndarray:
    """The uint8 images of ``idx``."""
    if len(idx) == 0:
        return np.zeros((0,) + tuple(split.images.shape[1:]), np.uint8)
    return np.stack([np.asarray(split.images[int(i)]) for i in idx])


def jsonable(obj):
    """numpy scalars → Python, non-finite floats → None, keys → str: what json.dumps writes."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def put_scalar(out: dict[str, float], name: str, v) -> None:
    """``out["test_<name>"] = v`` for a finite number (MLflow takes no None, bool or NaN)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and np.isfinite(v):
        out[f"test_{name}"] = float(v)


def put_trust_scalars(out: dict[str, float], metrics: dict) -> None:
    """The calibration and subgroup-audit scalars every task logs the same way (``test_ece``, ...,
    ``test_subgroup_largest_gap``, ``test_subgroup_gap_flag``)."""
    cal = metrics.get("calibration", {})
    for k in ("ece", "ece_scaled", "brier", "brier_scaled", "nll", "nll_scaled", "temperature"):
        put_scalar(out, k, cal.get(k))
    sg = metrics.get("subgroups", {})
    if sg.get("largest_gap"):
        put_scalar(out, "subgroup_largest_gap", sg["largest_gap"]["gap"])
    put_scalar(out, "subgroup_gap_flag", int(bool(sg.get("flagged"))))


def safe_name(name: str) -> str:
    """A class or label name as an MLflow metric key part."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def tta_comparison(ctx: Context, metrics_of, plain: dict, keys: tuple[str, ...]) -> dict:
    """Test-time augmentation's effect: ``metrics_of(scores)`` of the TTA-averaged test scores
    beside the ``plain`` metrics (``with``, ``without``, ``delta`` per key of ``keys``) and the
    views averaged (``ctx.tta``: the project's section)."""
    import torch

    from haven.learn import tta
    from haven.learn.data import normalize

    test, out = ctx.test, []
    with torch.inference_mode():
        for x, _ in test.batches(128, shuffle=False):
            out.append(tta.scores(ctx.model, normalize(x, test.mean, test.std), ctx.task, ctx.tta).numpy())
    with_tta = metrics_of(np.concatenate(out))
    record: dict = {"views": tta.views(ctx.tta), "shift": int(ctx.tta.get("shift") or 0)}
    for k in keys:
        a, b = plain.get(k), with_tta.get(k)
        record[k] = {"without": a, "with": b,
                     "delta": b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None}
    return record


def save_predictions(path: Path | None, probs: np.ndarray, labels: np.ndarray, scaled: np.ndarray | None,
                     **extra: np.ndarray) -> None:
    """The test split's scores and targets (and the temperature-scaled scores) as ``.npz``, when a
    path is given."""
    if path is None:
        return
    save = {"probs": probs, "labels": labels, **extra}
    if scaled is not None:
        save["probs_temperature_scaled"] = scaled
    np.savez_compressed(path, **save)
