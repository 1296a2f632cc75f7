"""The Task interface: what differs between learning tasks, in one object per task.

A Task owns the label encoding (manifest label column → the targets preprocess stores), the
head's width and the loss, how logits become scores, the validation metrics that early stopping
and the tuner watch, the test metrics, the columns of a predictions table and the report
sections that apply.  The stages (preprocess, train, tune, evaluate, report) ask the project's
Task and never branch on its name.  A new task is a new module in this package, registered in
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
    # report/model-card sections this task's evaluation produces (in page order)
    report_sections: tuple[str, ...] = ()

    @abstractmethod
    def classes(self, labels: pd.Series) -> list[str]:
        """The label vocabulary, in the order of the model's outputs, from the manifest's labels."""

    @abstractmethod
    def encode(self, labels: pd.Series, classes: list[str]) -> np.ndarray:
        """The targets stored with the images (one row per sample)."""

    @abstractmethod
    def outputs(self, classes: list[str]) -> int:
        """Width of the model's head."""

    @abstractmethod
    def loss(self, targets: np.ndarray, classes: list[str], hp: dict) -> nn.Module:
        """The training loss for these train-split targets and hyperparameters."""

    @abstractmethod
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits → the scores the metrics read (probabilities for classification)."""

    @abstractmethod
    def val_metrics(self, targets: np.ndarray, scores: np.ndarray) -> dict:
        """Validation metrics (``val_*``) for early stopping and the tuner."""

    @abstractmethod
    def metrics(self, targets: np.ndarray, scores: np.ndarray, classes: list[str], settings: dict) -> dict:
        """Test metrics for the evaluate stage (the ``evaluate`` config section in ``settings``)."""

    @abstractmethod
    def prediction_columns(self, classes: list[str]) -> list[str]:
        """The score columns of a predictions table (beside the sample's id columns)."""
