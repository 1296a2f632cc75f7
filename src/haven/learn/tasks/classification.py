"""Single-label classification: one class per image, softmax over the classes, cross-entropy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from haven.learn.tasks.base import Task


class Classification(Task):
    name = "classification"
    val_metric = "val_balanced_accuracy"

    def classes(self, labels: pd.Series) -> list[str]:
        return sorted(labels.unique())

    def encode(self, labels: pd.Series, classes: list[str]) -> np.ndarray:
        return labels.map({k: i for i, k in enumerate(classes)}).to_numpy(np.int64)

    def outputs(self, classes: list[str], hp: dict | None = None) -> int:
        return len(classes)

    def loss(self, targets: np.ndarray, classes: list[str], hp: dict) -> nn.Module:
        """Cross-entropy with label smoothing; inverse-frequency class weights unless the sampler
        balances the batches instead (``balance: sampler``) or nothing is balanced."""
        weight = None
        if hp["balance"] == "loss":
            counts = np.bincount(targets, minlength=len(classes)).astype(np.float64)
            weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(classes), dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=float(hp["label_smoothing"]))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def logits(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        return torch.log(scores.clamp_min(1e-12))  # softmax(log p) = p for p on the simplex

    def val_metrics(self, targets: np.ndarray, scores: np.ndarray) -> dict:
        from sklearn.metrics import balanced_accuracy_score

        if len(targets) == 0:
            return {}
        pred = scores.argmax(1)
        nll = float(-np.log(np.clip(scores[np.arange(len(targets)), targets], 1e-12, None)).mean())
        return {"val_loss": nll, "val_accuracy": float((pred == targets).mean()),
                "val_balanced_accuracy": float(balanced_accuracy_score(targets, pred))}

    def metrics(self, targets: np.ndarray, scores: np.ndarray, classes: list[str], settings: dict) -> dict:
        from haven.trust.metrics import compute_metrics, positive_index

        return compute_metrics(targets, scores, classes, positive_index(classes, settings["positive_label"]))

    def prediction_columns(self, classes: list[str]) -> list[str]:
        return [f"p_{c}" for c in classes] + [f"pcal_{c}" for c in classes] + ["predicted"]

    def evaluate(self, ctx) -> dict:
        from haven.trust import classify

        return classify.evaluate(ctx)

    def flat_metrics(self, metrics: dict) -> dict[str, float]:
        from haven.trust import classify

        return classify.flat_metrics(metrics)

    def rows(self, scores: np.ndarray, evaluation: dict, classes: list[str]) -> list[dict]:
        """``p_<class>`` (the model's probabilities), ``pcal_<class>`` (temperature-scaled) and
        ``predicted`` (the decision rule on the probabilities it was chosen on)."""
        from haven.trust.calibration import scale_temperature
        from haven.trust.decision import apply

        t, decision = evaluation.get("temperature"), evaluation.get("decision")
        calibrated = scale_temperature(scores, t) if t is not None and len(scores) else scores
        on = calibrated if decision and decision.get("calibrated") else scores
        predicted = apply(on, decision, classes) if len(scores) else np.zeros(0, int)
        return [{**{f"p_{c}": float(p[j]) for j, c in enumerate(classes)},
                 **{f"pcal_{c}": float(q[j]) for j, c in enumerate(classes)},
                 "predicted": classes[int(k)]}
                for p, q, k in zip(scores, calibrated, predicted)]
