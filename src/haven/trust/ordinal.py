"""Ordinal grading's evaluation (the evaluate stage's body for ``task: ordinal``; the numbers on
plain arrays are :mod:`haven.trust.ordinal_metrics`).

performance
    quadratic weighted kappa, exact-grade accuracy, mean absolute error in grades, per-grade
    sensitivity/specificity and the K x K grade confusion, and the binary *referable* view
    (grade >= ``ordinal.referable``: P(referable) = the grade probabilities summed from the cut)
    with its ROC/PR AUC and sensitivity/specificity at a threshold chosen on validation; every
    one with a patient-level bootstrap interval.
calibration
    of the K-grade distribution (top-label ECE, Brier, NLL; :mod:`haven.trust.calibration`).
    Temperature scaling divides the *log grade probabilities* by T and renormalizes: for a
    softmax head that is exactly logit temperature scaling, for CORN a one-parameter map of its
    distribution (one rule for both heads, and what a prediction's ``pcal_*`` columns apply).
    The predicted grade and the referable call always read the model's own probabilities.
bias, interpretability, robustness
    classify's pieces on the referable view: the subgroup audit, Grad-CAM / Integrated
    Gradients / the randomization check and FGSM/PGD, through :class:`ReferableView`, a wrapper
    whose two logits give that view's probability.
"""

from __future__ import annotations

import numpy as np
import torch  # this module loads inside the evaluate stage only (Ordinal.evaluate imports it)
from torch import nn

from haven.learn.models import ModelView
from haven.trust import classify, plots
from haven.trust.calibration import calibration
from haven.trust.context import Context, patient_clusters, save_predictions, tta_comparison
from haven.trust.decision import view_probabilities
from haven.trust.ordinal_metrics import (VIEW_CLASSES, bootstrap_intervals, ordinal_metrics, referable_probability,
                                         tables)

# the test metrics compared with and without test-time augmentation
TTA_METRICS = ("qwk", "accuracy", "balanced_accuracy", "roc_auc", "pr_auc")


class ReferableView(ModelView):
    """The graded model as a two-class referable classifier: logits ``[-z/2, z/2]`` with
    ``z = logit P(grade >= cut) - logit(threshold)``, so softmax gives P(referable) back, argmax
    is the validation threshold's call, and each class's logit carries gradient (with ``[0, z]``
    Grad-CAM of "not referable" would be blank).  Attributes it lacks (the backbone's stages,
    its classifier) are looked up on the wrapped model, so Grad-CAM finds its layers."""

    def __init__(self, model: nn.Module, task, cut: int, threshold: float):
        super().__init__(model)
        self.task = task
        self.cut = int(cut)
        t = float(np.clip(threshold, 1e-6, 1 - 1e-6))
        self.offset = float(np.log(t / (1 - t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.task.scores(self.model(x))[:, self.cut:].sum(1).clamp(1e-6, 1 - 1e-6)
        z = torch.logit(p) - self.offset
        return torch.stack([-z / 2, z / 2], 1)



def evaluate(ctx: Context, cut: int) -> dict:
    """Every ordinal metric of metrics.json, and every file of ``ctx.outputs`` (see the module
    docstring); ``cut``: the first referable grade."""
    s, test, lap = ctx.settings, ctx.test, ctx.lap
    scores, y = ctx.predict(test)
    val = ctx.predict(ctx.val) if ctx.val is not None else None
    decision = _decision(val, cut)
    threshold = decision["threshold"] if decision["threshold"] is not None else 0.5
    metrics = ordinal_metrics(y, scores, cut, decision["threshold"])
    metrics["chance_accuracy"] = float(np.bincount(y, minlength=scores.shape[1]).max() / len(y))
    if s["bootstrap"]:
        metrics["ci"] = bootstrap_intervals(y, scores, cut, threshold, int(s["bootstrap"]), float(s["ci_level"]),
                                            patient_clusters(test), ctx.seed)
    lap("metrics")
    if ctx.tta and ctx.tta.get("enabled"):
        metrics["tta"] = tta_comparison(ctx, lambda scores: ordinal_metrics(y, scores, cut, decision["threshold"]),
                                        metrics, TTA_METRICS)
        lap("tta")

    cal, scaled = calibration(scores, y, int(s["calibration_bins"]), val if s["temperature_scaling"] else None)
    metrics["calibration"] = cal
    metrics["decision"] = decision
    lap("calibration")

    y2, p2 = (y >= cut).astype(np.int64), referable_probability(scores, cut)
    probs2 = view_probabilities(p2, threshold)
    pred2 = probs2.argmax(1)
    metrics["subgroups"] = classify.subgroups(test, y2, probs2, VIEW_CLASSES, s, 1, ctx.outputs.subgroups_table)
    lap("subgroups")

    view = ReferableView(ctx.model, ctx.task, cut, threshold).eval()
    ex = classify.attributions(view, test, y2, pred2, VIEW_CLASSES, s, ctx.seed, ctx.outputs.plots)
    lap("explain")
    metrics["explain"] = classify.randomization(view, ex, y2, pred2, VIEW_CLASSES, s, ctx.seed,
                                                ctx.outputs.explain_maps)
    metrics["explain"]["view"] = f"referable (grade >= {cut}) vs not"
    lap("randomization")

    chance2 = float(max(y2.mean(), 1 - y2.mean()))
    metrics["robustness"] = classify.attack_robustness(view, test, y2, s, ctx.seed, chance2)
    metrics["robustness"]["view"] = f"referable (grade >= {cut}) vs not, at the validation threshold"
    lap("robustness")

    _figures(ctx, metrics, y, scores, y2, p2, scaled)
    save_predictions(ctx.outputs.predictions, scores, y, scaled, p_referable=p2)
    metrics["tables"] = tables(metrics)
    lap("plots")
    return metrics


def _decision(val, cut: int) -> dict:
    """What prediction applies: the median grade, and the referable call at the cut-off on the
    model's P(grade >= cut) with the largest sensitivity + specificity on the validation split
    (Youden's J; None, i.e. 0.5, without a split holding both views)."""
    from haven.trust.decision import youden_threshold

    out = {"rule": "ordinal", "grade": "median of the grade probabilities (#k with P(grade > k) > 0.5)",
           "referable_cut": int(cut), "positive": f"referable (grade >= {cut})", "threshold": None,
           "chosen_on": None, "calibrated": False}
    if val is not None and len(val[1]):
        vp, vy = val
        t = youden_threshold(referable_probability(vp, cut), np.asarray(vy) >= cut)
        if t is not None:
            out.update(threshold=t, chosen_on="val", criterion="youden", val_n=int(len(vy)))
    shown = f"{out['threshold']:.3f}" if out["threshold"] is not None else "0.5 (no validation split with both views)"
    out["text"] = (f"Predictions name the median grade of the model's grade probabilities, and call an image "
                   f"referable (grade >= {cut}) when P(grade >= {cut}) >= {shown}"
                   + (f", the cut-off with the largest sensitivity + specificity on the validation split "
                      f"(n = {out['val_n']}), never on the test split." if out["chosen_on"] else "."))
    return out


def _figures(ctx: Context, metrics: dict, y: np.ndarray, scores: np.ndarray, y2: np.ndarray, p2: np.ndarray,
             scaled: np.ndarray | None) -> None:
    """The summary figures (the attribution overlays are drawn with their maps): the grade
    confusion, the referable view's ROC and PR curves, the grade distribution's reliability."""
    s, cal = ctx.settings, metrics["calibration"]
    raw2 = np.stack([1 - p2, p2], 1)
    draw = {
        "confusion": lambda p: plots.plot_confusion(np.asarray(metrics["confusion_matrix"]), metrics["classes"], p),
        "roc": lambda p: plots.plot_roc(y2, raw2, VIEW_CLASSES, p, 1),
        "pr": lambda p: plots.plot_pr(y2, raw2, VIEW_CLASSES, p, 1),
        "reliability": lambda p: plots.plot_reliability(scores, y, p, int(s["calibration_bins"]), scaled,
                                                        cal.get("temperature")),
        "subgroups": lambda p: plots.plot_subgroups(metrics["subgroups"], p),
        "robustness": lambda p: plots.plot_robustness(metrics["robustness"], p, float(ctx.test.std.mean())),
    }
    for kind, fn in draw.items():
        if kind in ctx.outputs.plots:
            fn(ctx.outputs.plots[kind])
