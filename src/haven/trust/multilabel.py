"""Multi-label detection's evaluation (the evaluate stage's body for ``task: multilabel``; the
numbers on plain arrays are :mod:`haven.trust.multilabel_metrics`).

Every finding is a yes/no question of its own, so each trust question is asked per finding on its
*binary view* (y = the finding's 0/1 column, P = its sigmoid), reusing classify's pieces:

decision
    a threshold per finding with the largest sensitivity + specificity on the validation split
    (Youden's J, :func:`haven.trust.decision.youden_threshold`), on the temperature-scaled
    probabilities when a temperature is fitted; 0.5, with a note, where validation lacks a class.
performance
    per finding ROC AUC, PR AUC and sensitivity / specificity at its threshold; macro and micro
    ROC AUC and the RSNA weighted multi-label log loss; patient-level bootstrap intervals.
calibration
    per finding (:func:`haven.trust.calibration.calibration` on the view ``[1 - P, P]``, where
    temperature scaling is sigmoid(logit P / T)) with its own temperature fitted on validation;
    the headline ``calibration`` is the summary finding's.
bias
    the subgroup audit per finding at its threshold; the headline is the summary finding's audit,
    flagged when any finding's is; the subgroup table holds every finding (column ``label``).
interpretability
    Grad-CAM per finding (its logit as the target) on seeded test images showing it; Integrated
    Gradients and the randomization check on the summary finding's view.
robustness
    FGSM / PGD on the summary finding's view through :class:`LabelView`.

The summary finding is ``multilabel.summary_label`` or the last one (RSNA's ``any``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch  # this module loads inside the evaluate stage only (MultiLabel.evaluate imports it)
from torch import nn

from haven.learn.models import ModelView
from haven.trust import classify, plots
from haven.trust.calibration import calibration
from haven.trust.context import Context, column, patient_clusters, read, save_predictions, tta_comparison
from haven.trust.multilabel_metrics import (bootstrap_intervals, multilabel_metrics, scale_binary, tables,
                                            view_classes)
from haven.trust.decision import view_probabilities

# the test metrics compared with and without test-time augmentation
TTA_METRICS = ("macro_roc_auc", "micro_roc_auc", "weighted_log_loss", "balanced_accuracy")


class LabelView(ModelView):
    """One finding of the multi-label model as a two-class classifier: logits ``[-z/2, z/2]`` with
    ``z = logit_j - logit(threshold)``, so softmax gives the finding's probability re-centred at
    the threshold (argmax is the threshold's call) and both classes carry gradient.  Attributes it
    lacks (the backbone's stages) are looked up on the wrapped model, so Grad-CAM finds them."""

    def __init__(self, model: nn.Module, index: int, threshold: float):
        super().__init__(model)
        self.index = int(index)
        t = float(np.clip(threshold, 1e-6, 1 - 1e-6))
        self.offset = float(np.log(t / (1 - t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)[:, self.index].float() - self.offset
        return torch.stack([-z / 2, z / 2], 1)



def evaluate(ctx: Context, summary: str) -> dict:
    """Every multi-label metric of metrics.json and every file of ``ctx.outputs`` (see the module
    docstring); ``summary``: the finding the shared sections read."""
    s, test, lap, classes = ctx.settings, ctx.test, ctx.lap, ctx.classes
    p, y = ctx.predict(test)
    val = ctx.predict(ctx.val) if ctx.val is not None else None
    cals, scaled, decision = calibrate_and_decide(p, y, val, classes, s)
    raw = decision["raw_thresholds"]
    t = [raw[c] for c in classes]
    metrics = multilabel_metrics(y, p, classes, t)
    metrics["summary_label"] = summary
    # 1 - the Hamming loss of calling every finding's majority value
    metrics["chance_accuracy"] = float(np.mean(np.maximum(y.mean(0), 1 - y.mean(0))))
    if s["bootstrap"]:
        metrics["ci"] = bootstrap_intervals(y, p, classes, t, int(s["bootstrap"]), float(s["ci_level"]),
                                            patient_clusters(test), ctx.seed)
    lap("metrics")
    if ctx.tta and ctx.tta.get("enabled"):
        metrics["tta"] = tta_comparison(ctx, lambda scores: multilabel_metrics(y, scores, classes, t), metrics,
                                        TTA_METRICS)
        lap("tta")
    metrics["calibration"] = {**cals[summary], "label": summary}
    metrics["calibration_per_label"] = cals
    metrics["decision"] = decision
    lap("calibration")

    metrics["subgroups"] = subgroups(test, y, p, classes, t, s, summary, ctx.outputs.subgroups_table)
    lap("subgroups")

    _explain(ctx, metrics, y, p, t, summary)
    lap("explain")

    j = classes.index(summary)
    y2 = y[:, j].astype(np.int64)
    chance2 = float(max(y2.mean(), 1 - y2.mean()))
    metrics["robustness"] = classify.attack_robustness(LabelView(ctx.model, j, t[j]).eval(), test, y2, s, ctx.seed,
                                                       chance2)
    metrics["robustness"]["view"] = f"{summary} vs not, at its validation threshold"
    lap("robustness")

    _figures(ctx, metrics, y, p, scaled, t)
    save_predictions(ctx.outputs.predictions, p, y, scaled)
    metrics["tables"] = tables(metrics)
    lap("plots")
    return metrics


def calibrate_and_decide(p: np.ndarray, y: np.ndarray, val, classes: list[str], s: dict
                         ) -> tuple[dict, np.ndarray | None, dict]:
    """Per finding: calibration of the test view (temperature fitted on validation when
    ``temperature_scaling``) and the threshold chosen on validation.  Returns ({finding:
    calibration}, the (N, L) temperature-scaled test probabilities or None, the ``decision``
    record prediction applies: ``thresholds`` on the probabilities it names (calibrated when
    ``calibrated``), ``temperatures`` and ``raw_thresholds``, the same cut-offs on the model's own
    probabilities, which the metrics and the views use)."""
    from haven.trust.decision import youden_threshold

    fit = bool(s["temperature_scaling"]) and val is not None and len(val[1]) > 0
    cals, scaled, out = {}, [], {"rule": "per_label_threshold", "criterion": "youden", "calibrated": fit,
                                 "thresholds": {}, "raw_thresholds": {}, "temperatures": {}, "chosen_on": {},
                                 "val_n": int(len(val[1])) if val is not None else 0, "notes": {}}
    for j, c in enumerate(classes):
        yj = y[:, j].astype(np.int64)
        vj = (np.stack([1 - val[0][:, j], val[0][:, j]], 1), val[1][:, j].astype(np.int64)) if fit else None
        cal, sc = calibration(np.stack([1 - p[:, j], p[:, j]], 1), yj, int(s["calibration_bins"]), vj)
        cals[c] = cal
        scaled.append(sc[:, 1] if sc is not None else None)
        temp = cal.get("temperature")
        thr = None
        if val is not None and len(val[1]):
            thr = youden_threshold(scale_binary(val[0][:, j], temp), val[1][:, j] == 1)
        if thr is None:
            out["notes"][c] = "no validation split with both classes: threshold 0.5"
        # the same cut on the model's own probability: logit(raw) = T logit(thr)
        base = 0.5 if thr is None else thr
        raw = float(scale_binary(np.array([base]), None if temp is None else 1 / temp)[0])
        out["thresholds"][c], out["raw_thresholds"][c] = base, raw
        out["temperatures"][c], out["chosen_on"][c] = temp, "val" if thr is not None else None
    which = "temperature-scaled probability" if fit else "probability"
    out["text"] = ("Predictions name every finding whose " + which + " is at or above its threshold ("
                   + ", ".join(f"{c} {out['thresholds'][c]:.3f}" for c in classes) + "), chosen per finding on "
                   "the validation split (largest sensitivity + specificity), never on the test split"
                   + ("; 0.5 for " + ", ".join(out["notes"]) + " (no validation images with both classes)"
                      if out["notes"] else "") + ".")
    return cals, (np.stack(scaled, 1) if fit else None), out


def subgroups(test, y: np.ndarray, p: np.ndarray, classes: list[str], t: list[float], s: dict, summary: str,
              table_path) -> dict:
    """The subgroup audit of every finding's view at its threshold.  Returns the summary finding's
    audit (what the report and the figure read), ``flagged`` when any finding's audit is, with
    ``per_label`` {finding: flagged, largest gap, flagged attributes}; writes every finding's
    rows to ``table_path`` (column ``label`` first)."""
    from haven.trust.subgroups import subgroup_audit

    attrs = {a: column(test, a) for a in s["subgroups"]}
    audits, frames = {}, []
    for j, c in enumerate(classes):
        audit, table = subgroup_audit(y[:, j].astype(np.int64), view_probabilities(p[:, j], t[j]), view_classes(c),
                                      attrs, int(s["min_group_size"]), float(s["gap_threshold"]), s["gap_metrics"], 1)
        audits[c] = audit
        frames.append(table.assign(label=c)[["label", *table.columns]])
    if table_path is not None:
        pd.concat(frames, ignore_index=True).to_csv(table_path, index=False)
    out = dict(audits[summary])
    out["label"] = summary
    out["per_label"] = {c: {"flagged": a["flagged"], "largest_gap": a["largest_gap"],
                            "flagged_attributes": a["flagged_attributes"]} for c, a in audits.items()}
    out["flagged_labels"] = [c for c, a in audits.items() if a["flagged"]]
    out["flagged"] = bool(out["flagged_labels"])
    # every finding audits the same attributes (skipping depends on the values only): the report
    # names an attribute flagged for any finding
    out["flagged_attributes"] = sorted({a for e in audits.values() for a in e["flagged_attributes"]})
    return out


def _explain(ctx: Context, metrics: dict, y: np.ndarray, p: np.ndarray, t: list[float], summary: str) -> None:
    """Grad-CAM per finding; Integrated Gradients and the randomization check on the summary
    finding's view (``metrics["explain"]``)."""
    s, test, classes = ctx.settings, ctx.test, ctx.classes
    j = classes.index(summary)
    y2, probs2 = y[:, j].astype(np.int64), view_probabilities(p[:, j], t[j])
    pred2 = probs2.argmax(1)
    view = LabelView(ctx.model, j, t[j]).eval()
    ig_only = {k: v for k, v in ctx.outputs.plots.items() if k == "integrated_gradients"}
    ex = classify.attributions(view, test, y2, pred2, view_classes(summary), s, ctx.seed, ig_only)
    metrics["explain"] = classify.randomization(view, ex, y2, pred2, view_classes(summary), s, ctx.seed,
                                                ctx.outputs.explain_maps)
    metrics["explain"]["view"] = f"{summary} vs not, at its validation threshold (Grad-CAM: every finding)"
    metrics["explain"]["gradcam_per_label"] = label_gradcam(ctx, y, p, t, ctx.outputs.plots.get("gradcam"))


def label_gradcam(ctx: Context, y: np.ndarray, p: np.ndarray, t: list[float], path) -> dict[str, int]:
    """Grad-CAM of each finding's logit on up to ``explain_per_class`` detected and as many missed
    seeded test images showing it, drawn one row per finding at ``path``; {finding: images}."""
    from haven.learn.data import normalize
    from haven.trust.explain import attribution_maps, gradcam_layer, select_examples

    s, test, classes = ctx.settings, ctx.test, ctx.classes
    per = int(s["explain_per_class"])
    entries = []
    for j in range(len(classes)):
        yj, call = y[:, j].astype(np.int64), (p[:, j] >= t[j]).astype(np.int64)
        entries += [(j, i, ok, float(p[i, j])) for i, ok in select_examples(yj, call, per, ctx.seed) if yj[i] == 1]
    idx = np.array([e[1] for e in entries], dtype=int)
    raw = read(test, idx)
    if len(idx):
        black = normalize(torch.zeros((1, test.channels) + tuple(test.images.shape[-2:]), dtype=torch.uint8),
                          test.mean, test.std)
        xs = normalize(torch.from_numpy(raw), test.mean, test.std)
        # attribution_maps also integrates gradients; only its Grad-CAM is used here, so 2 IG steps
        gc, _, _ = attribution_maps(ctx.model, xs, [e[0] for e in entries], gradcam_layer(ctx.model,
                                    int(s["gradcam_stage"])), 2, black)
    else:
        gc = np.zeros((0,) + tuple(test.images.shape[-2:]))
    if path is not None:
        plots.plot_label_gradcam(raw, gc, entries, classes, path, per, dict(test.group.attrs).get("mode"))
    return {c: sum(e[0] == j for e in entries) for j, c in enumerate(classes)}


def _figures(ctx: Context, metrics: dict, y: np.ndarray, p: np.ndarray, scaled: np.ndarray | None,
             t: list[float]) -> None:
    """The summary figures (the attribution overlays are drawn with their maps)."""
    s, classes = ctx.settings, ctx.classes
    ece = {c: v.get("ece") for c, v in metrics["calibration_per_label"].items()}
    draw = {
        "confusion": lambda f: plots.plot_label_confusion(y, p >= np.asarray(t), classes, f),
        "roc": lambda f: plots.plot_label_curves(y, p, classes, f, "roc"),
        "pr": lambda f: plots.plot_label_curves(y, p, classes, f, "pr"),
        "reliability": lambda f: plots.plot_label_reliability(y, p, classes, f, int(s["calibration_bins"]), scaled,
                                                              ece),
        "subgroups": lambda f: plots.plot_subgroups(metrics["subgroups"], f),
        "robustness": lambda f: plots.plot_robustness(metrics["robustness"], f, float(ctx.test.std.mean())),
    }
    for kind, fn in draw.items():
        if kind in ctx.outputs.plots:
            fn(ctx.outputs.plots[kind])
