"""Multi-label detection: several findings per image at once (intracranial hemorrhage subtypes in
the RSNA Intracranial Hemorrhage Detection layout: epidural, intraparenchymal, intraventricular,
subarachnoid, subdural and ``any``).

Labels come from ingest as one self-describing string per image, ``epidural=0;subdural=1;any=1``
(one 0/1 label-table column per finding, ``label_column`` a list); the classes are the finding
names in that order and the targets a float32 (N, L) 0/1 matrix.  The head has one logit per
finding, the scores are independent sigmoids (an image may show several findings, or none) and
the loss is a binary cross-entropy per finding with a positive weight = negatives / positives on
the train split, so a rare subtype is not drowned by its negatives.

The validation metric is the macro ROC AUC (the mean over findings with both classes present):
threshold-free, so early stopping does not depend on a cut-off chosen later.  The evaluation
(:mod:`haven.trust.multilabel`) chooses a threshold per finding on validation.  For the stages
and reports written for one label per image, ``metrics.json`` also carries ``roc_auc`` = the macro
ROC AUC and ``balanced_accuracy`` = the mean over findings of (sensitivity + specificity) / 2 at
those thresholds, so a ``best_metric: test_balanced_accuracy`` or the model card still read one
number per run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from haven.learn.tasks.base import Task

# a rare finding's positive weight is capped: one positive in 10,000 should not make a loss of spikes
MAX_POS_WEIGHT = 100.0


def parse_label(label: str) -> list[tuple[str, int]]:
    """``"epidural=0;any=1"`` → ``[("epidural", 0), ("any", 1)]``; a ValueError naming the label
    and the fix when it is not that shape."""
    pairs = []
    for part in str(label).split(";"):
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name:
            raise ValueError(f"multilabel label {label!r} is not name=0/1;name=0/1;... : a multilabel project needs "
                             f"one 0/1 label-table column per finding (set `label_column` to the list of those "
                             f"columns), or `task: classification` for one label per image")
        if value not in ("0", "1"):
            raise ValueError(f"multilabel label {label!r}: finding {name!r} is {value!r}, not 0 or 1; write each "
                             f"finding column of the label table as 0 or 1")
        pairs.append((name, int(value)))
    return pairs


class BCEWithSmoothing(nn.BCEWithLogitsLoss):
    """BCE with logits and per-finding positive weights, with label smoothing: targets pulled
    toward 0.5 by ``smoothing`` (a 1 becomes 1 - s/2), the binary form of softmax smoothing."""

    def __init__(self, pos_weight: torch.Tensor | None = None, smoothing: float = 0.0):
        super().__init__(pos_weight=pos_weight)
        self.smoothing = float(smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = targets.float() * (1 - self.smoothing) + self.smoothing / 2
        return super().forward(logits.float(), t)


class MultiLabel(Task):
    """Several 0/1 findings per image: sigmoid outputs, BCE with per-finding positive weights,
    macro ROC AUC on validation; ``multilabel.summary_label`` (default: the last finding, RSNA's
    ``any``) is the finding whose binary view the shared trust sections use."""

    name = "multilabel"
    test_metric = "macro_roc_auc"
    val_metric = "val_macro_roc_auc"
    reports_every_class = True  # a DICOM SR states every finding's probability, the negatives too

    def summary_label(self, classes: list[str]) -> str:
        s = self.options.get("summary_label")
        if s is None:
            return classes[-1]
        if s not in classes:
            raise ValueError(f"multilabel.summary_label {s!r} is not a finding of this project ({', '.join(classes)}): "
                             f"set it to one of them, or null for the last")
        return s

    def classes(self, labels: pd.Series) -> list[str]:
        """The finding names of the manifest's labels, in their order; every label must name the
        same findings in the same order."""
        uniq = pd.Series(labels).astype(str).unique()
        if len(uniq) == 0:
            raise ValueError("multilabel: the manifest holds no label; give the label table's finding columns")
        first = [n for n, _ in parse_label(uniq[0])]
        if len(set(first)) != len(first):
            raise ValueError(f"multilabel label {uniq[0]!r} names a finding twice: give each finding one column")
        for label in uniq[1:]:
            names = [n for n, _ in parse_label(label)]
            if names != first:
                raise ValueError(f"multilabel label {label!r} names the findings ({', '.join(names)}), another label "
                                 f"({', '.join(first)}): every row must name the same findings in the same order "
                                 f"(one label table, `label_column` its finding columns)")
        return first

    def strata(self, labels: pd.Series) -> pd.Series:
        """The split stratifies on the summary finding (``any``): the combinations of several
        findings are mostly too rare to stratify on."""
        if labels.empty:
            return labels
        key = self.summary_label(self.classes(labels))
        return labels.map(lambda v: dict(parse_label(v))[key])

    def encode(self, labels: pd.Series, classes: list[str]) -> np.ndarray:
        labels = pd.Series(labels).astype(str)
        rows = {}
        for label in labels.unique():  # a few distinct strings however many images
            pairs = parse_label(label)
            if [n for n, _ in pairs] != list(classes):
                raise ValueError(f"multilabel label {label!r} does not name the findings ({', '.join(classes)}) in "
                                 f"that order: every row must name the same findings")
            rows[label] = [v for _, v in pairs]
        out = np.array([rows[v] for v in labels], np.float32)
        return out.reshape(len(labels), len(classes))

    def counts(self, labels: pd.Series, classes: list[str]) -> dict:
        """Positives per finding and ``n`` (images) of one split."""
        y = self.encode(labels, classes) if len(labels) else np.zeros((0, len(classes)), np.float32)
        return {**{c: int(y[:, j].sum()) for j, c in enumerate(classes)}, "n": int(len(y))}

    def describe(self, classes: list[str]) -> str:
        return f"a multi-label detector of {len(classes)} findings at once ({', '.join(classes)})"

    def outputs(self, classes: list[str], hp: dict | None = None) -> int:
        return len(classes)

    def loss(self, targets: np.ndarray, classes: list[str], hp: dict) -> nn.Module:
        """BCE per finding, positive weight = negatives / positives on the train split (capped at
        :data:`MAX_POS_WEIGHT`; 1 for a finding without positives), none with ``balance: none``."""
        pos_weight = None
        if hp.get("balance", "loss") != "none":
            y = np.asarray(targets, np.float64).reshape(len(targets), -1)
            pos = y.sum(0)
            w = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0)
            pos_weight = torch.tensor(np.clip(w, 1e-3, MAX_POS_WEIGHT), dtype=torch.float32)
        return BCEWithSmoothing(pos_weight, float(hp.get("label_smoothing") or 0.0))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def logits(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        return torch.logit(scores.float().clamp(1e-6, 1 - 1e-6))  # sigmoid(logit p) = p

    def val_metrics(self, targets: np.ndarray, scores: np.ndarray) -> dict:
        from haven.trust.multilabel_metrics import macro_micro_auc, per_sample_log_loss

        if len(targets) == 0:
            return {}
        macro, micro = macro_micro_auc(targets, scores)
        # undefined (no finding with both classes): 0.5, chance, so a run still ranks
        return {"val_loss": float(per_sample_log_loss(targets, scores).mean()),
                "val_macro_roc_auc": macro if macro is not None else 0.5,
                "val_micro_roc_auc": micro if micro is not None else 0.5}

    def metrics(self, targets: np.ndarray, scores: np.ndarray, classes: list[str], settings: dict) -> dict:
        from haven.trust.multilabel_metrics import multilabel_metrics

        return multilabel_metrics(targets, scores, classes)

    def prediction_columns(self, classes: list[str]) -> list[str]:
        return [f"p_{c}" for c in classes] + [f"pcal_{c}" for c in classes] + ["predicted"]

    def evaluate(self, ctx) -> dict:
        from haven.trust import multilabel

        return multilabel.evaluate(ctx, self.summary_label(ctx.classes))

    def flat_metrics(self, metrics: dict) -> dict[str, float]:
        from haven.trust.multilabel_metrics import flat_metrics

        return flat_metrics(metrics)

    def rows(self, scores: np.ndarray, evaluation: dict, classes: list[str]) -> list[dict]:
        """``p_<finding>`` (the model's sigmoids), ``pcal_<finding>`` (per-finding temperature from
        evaluate's decision) and ``predicted``: the findings at or above their validation
        thresholds joined by ``+``, or ``none``."""
        from haven.trust.multilabel_metrics import prediction_rows

        return prediction_rows(scores, evaluation, classes)
