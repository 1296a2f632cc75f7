"""Ordinal grading: one integer grade 0..K-1 per image (diabetic retinopathy 0-4), where a miss by
two grades is worse than a miss by one.

Two heads, one choice (``ordinal.method``, or ``ordinal_method`` in a tune search):

corn (default)
    CORN (Shi, Cao & Raschka 2021, "Deep neural networks for rank-consistent ordinal regression
    based on conditional probabilities"): K-1 logits, logit k the conditional P(y > k | y > k-1),
    trained with a binary cross-entropy per k on the samples with y >= k only.  The chained
    product P(y > k) = prod_{j<=k} sigmoid(z_j) can only fall with k, so the grades are
    rank-consistent by construction.
softmax
    a plain K-class softmax with cross-entropy, blind to the order: the baseline CORN must beat.

Whatever the head, :meth:`Ordinal.scores` returns the K grade probabilities (the head's width,
K-1 or K, tells the two apart, so scores needs no hyperparameter), and every reader (metrics,
calibration, prediction) works on them.  The predicted grade is the median of that distribution
(:func:`haven.trust.ordinal_metrics.grade`): for CORN exactly its rank-consistent rule, for softmax
the grade with the least expected absolute error.  The loss is written here (15 lines) rather than
taken from ``coral-pytorch``: its last release (1.4.0, 2022) has no per-grade weights and declares
setuptools a runtime dependency; the test checks ours against a by-hand BCE sum.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch
from torch import nn

from haven.learn.tasks.base import Task

class CornLoss(nn.Module):
    """CORN's loss: for each k < K-1 the BCE of logit k against ``y > k`` over the samples with
    ``y >= k`` (the conditional training sets), summed and divided by the number of terms (as
    coral-pytorch's ``corn_loss``); ``weight`` (K,) weighs each sample's terms by its grade."""

    def __init__(self, grades: int, weight: torch.Tensor | None = None):
        super().__init__()
        self.grades = grades
        self.register_buffer("weight", weight if weight is not None else torch.ones(grades))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.grades - 1, device=logits.device)
        y = y.long()
        in_set = (y[:, None] >= k).float() * self.weight[y][:, None]   # (N, K-1): sample i trains task k
        target = (y[:, None] > k).float()
        bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        return (bce * in_set).sum() / in_set.sum().clamp_min(1e-12)


def corn_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """K-1 CORN logits → K grade probabilities: p_k = P(y > k-1) - P(y > k)."""
    above = torch.cumprod(torch.sigmoid(logits.float()), dim=1)        # P(y > k), k = 0..K-2
    one = torch.ones_like(above[:, :1])
    return (torch.cat([one, above], 1) - torch.cat([above, torch.zeros_like(one)], 1)).clamp_min(0)


class Ordinal(Task):
    """Integer grades 0..K-1: a CORN or softmax head, QWK as the validation metric and the
    referable view (grade >= ``referable``) in the evaluation (:mod:`haven.trust.ordinal`)."""

    name = "ordinal"
    test_metric = "qwk"
    val_metric = "val_qwk"

    def option(self, key: str):
        v = self.options.get(key)  # options hold what the project set; the schema's defaults otherwise
        if v is None:
            from haven.config import section_defaults

            return section_defaults("ordinal")[key]
        return v

    @property
    def grades(self) -> int:
        return int(self.option("grades"))

    @property
    def referable(self) -> int:
        return int(self.option("referable"))

    def method(self, hp: dict | None = None) -> str:
        """The head: the trial's ``ordinal_method`` when a search sets one, else ``ordinal.method``."""
        m = (hp or {}).get("ordinal_method") or self.option("method")
        if m not in ("corn", "softmax"):
            raise ValueError(f"ordinal method {m!r} is unknown: set ordinal.method to corn or softmax")
        return m

    def classes(self, labels: pd.Series) -> list[str]:
        """Always ``["0", ..., "K-1"]`` (a grade absent from the data is still a grade); a label that
        is not one of these integers is refused, naming it."""
        k = self.grades
        if not 1 <= self.referable < k:
            raise ValueError(f"ordinal.referable = {self.referable} must lie in 1..{k - 1} (grades: {k})")
        bad = sorted({str(v) for v in labels if not _is_grade(v, k)})
        if bad:
            shown = ", ".join(repr(b) for b in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise ValueError(f"ordinal labels must be the integers 0..{k - 1}; the label table has {shown}: "
                             f"write each grade as a plain integer (3, not 3.0 or 'moderate'), or set "
                             f"ordinal.grades to the scale's number of grades")
        return [str(i) for i in range(k)]

    def encode(self, labels: pd.Series, classes: list[str]) -> np.ndarray:
        self.classes(labels)  # the same check, for a split encoded on its own
        return np.array([int(str(v).strip()) for v in labels], dtype=np.int64)

    def counts(self, labels: pd.Series, classes: list[str]) -> dict:
        grades = pd.Series([str(int(str(v).strip())) for v in labels], dtype=object)
        return {c: int((grades == c).sum()) for c in classes}

    def describe(self, classes: list[str]) -> str:
        return f"an ordinal grader on a {len(classes)}-grade scale ({', '.join(classes)})"

    def outputs(self, classes: list[str], hp: dict | None = None) -> int:
        return len(classes) - 1 if self.method(hp) == "corn" else len(classes)

    def loss(self, targets: np.ndarray, classes: list[str], hp: dict) -> nn.Module:
        """CORN's loss or cross-entropy (with label smoothing); ``balance: loss`` weighs each
        grade by its inverse frequency in either."""
        k = len(classes)
        weight = None
        if hp.get("balance") == "loss":
            counts = np.bincount(np.asarray(targets, np.int64), minlength=k).astype(np.float64)
            weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / k, dtype=torch.float32)
        if self.method(hp) == "corn":
            return CornLoss(k, weight)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=float(hp.get("label_smoothing") or 0.0))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The K grade probabilities, from a CORN head (K-1 logits) or a softmax one (K)."""
        k = self.grades
        if logits.shape[1] == k - 1:
            return corn_probabilities(logits)
        if logits.shape[1] == k:
            return torch.softmax(logits.float(), dim=1)
        raise ValueError(f"an ordinal model for {k} grades has {k - 1} (corn) or {k} (softmax) outputs, "
                         f"this one {logits.shape[1]}: check ordinal.grades against the trained model")

    def logits(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        """Grade probabilities → logits of a head of ``width`` that give them back: log p for
        softmax, for CORN the conditionals logit(P(y > k) / P(y > k-1)) (an ensemble's mean)."""
        p = scores.float().clamp_min(0)
        if width == self.grades:
            return torch.log(p.clamp_min(1e-12))
        at_least = p.flip(1).cumsum(1).flip(1)                           # P(y >= k), k = 0..K-1
        cond = at_least[:, 1:] / at_least[:, :-1].clamp_min(1e-12)      # P(y > k | y > k-1)
        return torch.logit(cond.clamp(1e-6, 1 - 1e-6))

    def val_metrics(self, targets: np.ndarray, scores: np.ndarray) -> dict:
        from haven.trust.ordinal_metrics import grade, quadratic_kappa

        if len(targets) == 0:
            return {}
        pred = grade(scores)
        nll = float(-np.log(np.clip(scores[np.arange(len(targets)), targets], 1e-12, None)).mean())
        qwk = quadratic_kappa(targets, pred, scores.shape[1])
        return {"val_loss": nll, "val_accuracy": float((pred == targets).mean()),
                # undefined (one grade only in both): 0, no better than chance, so a run still ranks
                "val_qwk": qwk if qwk is not None else 0.0}

    def metrics(self, targets: np.ndarray, scores: np.ndarray, classes: list[str], settings: dict) -> dict:
        from haven.trust.ordinal_metrics import ordinal_metrics

        return ordinal_metrics(targets, scores, self.referable)

    def prediction_columns(self, classes: list[str]) -> list[str]:
        return ([f"p_{c}" for c in classes] + [f"pcal_{c}" for c in classes]
                + ["p_referable", "predicted", "referable"])

    def evaluate(self, ctx) -> dict:
        from haven.trust import ordinal

        return ordinal.evaluate(ctx, self.referable)

    def flat_metrics(self, metrics: dict) -> dict[str, float]:
        from haven.trust.ordinal_metrics import flat_metrics

        return flat_metrics(metrics)

    def rows(self, scores: np.ndarray, evaluation: dict, classes: list[str]) -> list[dict]:
        """``p_<grade>``, ``pcal_<grade>`` (temperature-scaled), ``p_referable`` = P(grade >=
        referable), ``predicted`` (the median grade) and ``referable`` (yes/no at the threshold
        chosen on validation, 0.5 without one)."""
        from haven.trust.ordinal_metrics import prediction_rows

        return prediction_rows(scores, evaluation, classes, self.referable)


def _is_grade(v, k: int) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, np.integer)):
        return 0 <= int(v) < k
    s = str(v).strip()
    return bool(re.fullmatch(r"\d+", s)) and int(s) < k
