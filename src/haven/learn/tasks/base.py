"""The Task interface: what differs between learning tasks, in one object per task.

A Task owns the label encoding (manifest label column → the targets preprocess stores), the
head's width and the loss, how logits become scores (and back, for an ensemble), the validation
metrics that early stopping and the tuner watch, the whole evaluation (its module in
:mod:`haven.trust`: metrics, calibration, bias, explanations and robustness adapted to what it
predicts, and the report's tables), and the rows of a predictions table.  The stages
(preprocess, train, tune, evaluate, report, predict) ask the project's Task and never branch on
its name.  A new task is a new module in this package, registered in
``haven.learn.tasks.TASKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import pandas as pd
import torch
from torch import nn


class Task(ABC):
    """One kind of learning problem (single-label classification, multi-label, ordinal, ...)."""

    name: str = ""
    # the validation metric (a key of val_metrics, higher is better) that picks the best epoch and
    # early-stops; the train stage reports it as best_<val_metric>
    val_metric: str = ""
    # whether a prediction's DICOM SR states every class with its probability (several findings at
    # once) or the predicted class alone
    reports_every_class: bool = False
    # the test metric (a top-level number of metrics.json, higher is better) that picks the
    # registry's champion when the config's best_metric is not one this task reports
    test_metric: str = "balanced_accuracy"
    # what preprocess stores as the targets: "labels" (the task's encoding of the manifest label, one
    # row per sample) or "masks" (a class per pixel, decoded from mask files beside the images)
    targets: str = "labels"
    # whether training needs a label on every file (a segmentation's labels are its masks)
    needs_labels: bool = True

    def __init__(self, options: dict | None = None):
        # the project's section named after the task (`multilabel:`, `ordinal:`), defaults filled in
        self.options = dict(options or {})

    def strata(self, labels: pd.Series) -> pd.Series:
        """What the patient-level split stratifies on, per label (default: the label itself)."""
        return labels

    def counts(self, labels: pd.Series, classes: list[str]) -> dict:
        """Samples per class of one split, for ``stats.json`` and the report."""
        return labels.value_counts().sort_index().to_dict()

    @abstractmethod
    def classes(self, labels: pd.Series) -> list[str]:
        """The label vocabulary, in the order of the model's outputs, from the manifest's labels."""

    @abstractmethod
    def encode(self, labels: pd.Series, classes: list[str]) -> np.ndarray:
        """The targets stored with the images (one row per sample)."""

    def describe(self, classes: list[str]) -> str:
        """What the model does, in words (the model card's intended use)."""
        return f"a {len(classes)}-class image classifier ({', '.join(classes)})"

    def network(self, backbone: str, width: int, weights, in_chans: int, dims: int = 2) -> nn.Module:
        """The network (a pretrained backbone with a head of ``width`` outputs); weights None: random
        (a trained model's are loaded over them).  ``dims`` 3: a MONAI 3D classifier of volumes,
        trained from scratch (:mod:`haven.learn.net3d`)."""
        if dims == 3:
            from haven.learn.net3d import build_classifier3d

            return build_classifier3d(backbone, width, weights=weights, in_chans=in_chans)
        from haven.learn.models import build_model

        return build_model(backbone, width, weights=weights, in_chans=in_chans)

    @abstractmethod
    def outputs(self, classes: list[str], hp: dict | None = None) -> int:
        """Width of the model's head (``hp``: the run's hyperparameters, when the width depends on one)."""

    @abstractmethod
    def loss(self, targets: np.ndarray, classes: list[str], hp: dict) -> nn.Module:
        """The training loss for these train-split targets and hyperparameters."""

    @abstractmethod
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits → the scores the metrics read (probabilities for classification)."""

    def logits(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        """The inverse of :meth:`scores`: logits of head width ``width`` whose scores are ``scores``
        (an ensemble averages its members' scores and hands them on as one network's logits)."""
        raise NotImplementedError(f"task {self.name!r} cannot be averaged into an ensemble (no Task.logits)")

    @abstractmethod
    def val_metrics(self, targets: np.ndarray, scores: np.ndarray) -> dict:
        """Validation metrics (``val_*``) for early stopping and the tuner."""

    @abstractmethod
    def metrics(self, targets: np.ndarray, scores: np.ndarray, classes: list[str], settings: dict) -> dict:
        """Test metrics for the evaluate stage (the ``evaluate`` config section in ``settings``)."""

    @abstractmethod
    def prediction_columns(self, classes: list[str]) -> list[str]:
        """The columns of :meth:`rows`, in order (a predictions table's, beside the sample's ids)."""

    @abstractmethod
    def evaluate(self, ctx) -> dict:
        """The evaluate stage's body for this task: every metric of ``metrics.json`` (the stage adds
        ``settings`` and ``seconds``) and every file of ``ctx.outputs`` (a figure that does not
        apply is drawn as a panel saying why).  ``ctx``: :class:`haven.trust.context.Context`."""

    @abstractmethod
    def flat_metrics(self, metrics: dict) -> dict[str, float]:
        """The scalars of ``metrics.json`` logged to MLflow (``test_*``)."""

    @abstractmethod
    def rows(self, scores: np.ndarray, evaluation: dict, classes: list[str]) -> list[dict]:
        """One predictions-table row per sample from the task's scores: ``p_<class>`` and
        ``pcal_<class>`` columns and ``predicted``, under the decision rule ``evaluation`` (what
        evaluate recorded: temperature, decision) chose on validation."""
