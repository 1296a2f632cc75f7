"""Single-label classification's evaluation (the body of the evaluate stage for ``task:
classification``; see :mod:`haven.trust.evaluate` for the five questions and the files).

The pieces take plain arrays (targets, probabilities, class names, the positive class), so a task
with a binary clinical view (any hemorrhage, referable retinopathy) reuses them on that view.

A volume project (5-D test store) is evaluated the same way on whole volumes: no test-time
augmentation (``tta_skipped`` says why), Grad-CAM on the last 3D stage and IG as volumes drawn by
their mid slices, and fewer volumes and steps explained and attacked (:mod:`haven.trust.volume`,
``volume_limits`` in metrics.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from haven.trust import plots
from haven.trust.calibration import calibration
from haven.trust.context import (Context, column, patient_clusters, put_scalar, put_trust_scalars, read, safe_name,
                                 save_predictions, tta_comparison)
from haven.trust.explain import attribution_maps, gradcam_layer, randomization_test, select_examples
from haven.trust.metrics import bootstrap_ci, positive_index
from haven.trust.robustness import robustness, stratified_subsample
from haven.trust.subgroups import subgroup_audit
from haven.trust.volume import SLICES, TTA_SKIPPED, capped, is_volume, mid_slices

if TYPE_CHECKING:  # torch loads inside the stage, not when the CLI imports this module
    import torch


def evaluate(ctx: Context) -> dict:
    """Every classification metric of metrics.json, and every file of ``ctx.outputs``."""
    test, model, task, classes, lap = ctx.test, ctx.model, ctx.task, ctx.classes, ctx.lap
    s, limits = capped(ctx.settings, is_volume(test))  # a volume is explained and attacked on fewer samples
    pos = positive_index(classes, s["positive_label"])
    probs, y = ctx.predict(test)
    pred = probs.argmax(1)
    metrics = _performance(task, test, y, probs, classes, s, pos, ctx.seed)
    if is_volume(test):
        metrics["volume_limits"] = limits
    lap("metrics")
    if ctx.tta and ctx.tta.get("enabled") and is_volume(test):
        metrics["tta_skipped"] = TTA_SKIPPED
    elif ctx.tta and ctx.tta.get("enabled"):
        metrics["tta"] = tta_comparison(ctx, lambda scores: task.metrics(y, scores, classes, s), metrics, TTA_METRICS)
        lap("tta")

    val = ctx.predict(ctx.val) if ctx.val is not None else None
    cal, scaled = calibration(probs, y, int(s["calibration_bins"]), val if s["temperature_scaling"] else None)
    metrics["calibration"] = cal
    metrics["decision"] = _decision(val, classes, pos, cal.get("temperature"))
    lap("calibration")

    metrics["subgroups"] = subgroups(test, y, probs, classes, s, pos, ctx.outputs.subgroups_table)
    lap("subgroups")

    ex = attributions(model, test, y, pred, classes, s, ctx.seed, ctx.outputs.plots)
    lap("explain")
    metrics["explain"] = randomization(model, ex, y, pred, classes, s, ctx.seed, ctx.outputs.explain_maps)
    lap("randomization")

    metrics["robustness"] = attack_robustness(model, test, y, s, ctx.seed, metrics["chance_accuracy"])
    lap("robustness")

    _figures(ctx.outputs.plots, metrics, y, probs, classes, pos, s, scaled, pixel=float(test.std.mean()))
    save_predictions(ctx.outputs.predictions, probs, y, scaled)
    lap("plots")
    return metrics


@dataclass
class _Explained:
    """The seeded explained sample, shared by the overlays and the randomization check."""

    examples: list[tuple[int, bool]]
    idx: np.ndarray
    xs: torch.Tensor  # normalized network input of the sample
    black: torch.Tensor  # IG baseline: a black image in normalized units
    layer: object
    gc: np.ndarray
    ig: np.ndarray
    delta: np.ndarray


def _module_name(model, layer) -> str:
    from haven.learn.models import unwrap

    name = next((n for n, m in unwrap(model).named_modules() if m is layer), type(layer).__name__)
    return f"{name} ({type(layer).__name__})"


def _decision(val, classes: list[str], pos: int, temperature: float | None) -> dict:
    """The decision rule prediction applies (:mod:`haven.trust.decision`), chosen on the val split
    (``val``: its probabilities and targets, or None)."""
    from haven.trust.decision import choose

    return choose(*(val if val is not None else (None, None)), classes, pos, temperature)


# the test metrics compared with and without test-time augmentation
TTA_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc")


def _performance(task, test, y: np.ndarray, probs: np.ndarray, classes: list[str], s: dict, pos: int,
                 seed: int) -> dict:
    """The headline metrics (the Task's, so another task brings its own), chance and the CIs."""
    metrics = task.metrics(y, probs, classes, s)
    metrics["chance_accuracy"] = float(np.bincount(y, minlength=len(classes)).max() / max(len(y), 1))
    clusters = patient_clusters(test)
    if s["bootstrap"] and len(y):
        metrics["ci"] = bootstrap_ci(y, probs, classes, int(s["bootstrap"]), float(s["ci_level"]), clusters,
                                     seed, pos)
    return metrics


def subgroups(test, y: np.ndarray, probs: np.ndarray, classes: list[str], s: dict, pos: int,
               table_path: Path | None) -> dict:
    attrs = {a: column(test, a) for a in s["subgroups"]}
    audit, table = subgroup_audit(y, probs, classes, attrs, int(s["min_group_size"]), float(s["gap_threshold"]),
                                  s["gap_metrics"], pos)
    if table_path is not None:
        table.to_csv(table_path, index=False)
    return audit


def attributions(model, test, y: np.ndarray, pred: np.ndarray, classes: list[str], s: dict, seed: int,
                  plot_paths: dict[str, Path]) -> _Explained:
    """Grad-CAM and IG maps of the seeded example sample, and their overlays."""
    import torch

    from haven.learn.data import normalize

    mode = dict(test.group.attrs).get("mode")
    mean, std = test.mean, test.std
    black = normalize(torch.zeros((1, test.channels) + tuple(test.images.shape[2:]), dtype=torch.uint8), mean, std)
    examples = select_examples(y, pred, int(s["explain_per_class"]), seed)
    idx = np.array([i for i, _ in examples], dtype=int)
    raw = read(test, idx)
    xs = normalize(torch.from_numpy(raw), mean, std)
    layer = gradcam_layer(model, int(s["gradcam_stage"]))
    gc, ig, delta = attribution_maps(model, xs, pred[idx], layer, int(s["ig_steps"]), black)
    per_class = int(s["explain_per_class"])
    # a volume is drawn as its middle slices (haven.trust.volume.mid_slices), maps and image alike
    volume = raw.ndim == 5
    shown, cut = (mid_slices(raw), mid_slices) if volume else (raw, lambda m: m)
    where, wide = (f" ({SLICES})", 2.6) if volume else ("", 1.0)
    if "gradcam" in plot_paths:
        plots.plot_attributions(shown, cut(gc), examples, y, pred, classes, "Grad-CAM" + where,
                                plot_paths["gradcam"], per_class, mode, signed=True, panel_width=wide)
    if "integrated_gradients" in plot_paths:
        plots.plot_attributions(shown, cut(ig), examples, y, pred, classes, "Integrated Gradients" + where,
                                plot_paths["integrated_gradients"], per_class, mode, panel_width=wide)
    return _Explained(examples, idx, xs, black, layer, gc, ig, delta)


def randomization(model, ex: _Explained, y: np.ndarray, pred: np.ndarray, classes: list[str], s: dict, seed: int,
                   maps_path: Path | None) -> dict:
    """The model-randomization check on a seeded part of the explained sample, and the explain
    summary for metrics.json."""
    k = min(int(s["randomization_samples"]), len(ex.idx))
    sub = np.sort(np.random.default_rng(seed).permutation(len(ex.idx))[:k])
    if k:
        rnd = randomization_test(model, ex.xs[sub], pred[ex.idx][sub],
                                 lambda m: gradcam_layer(m, int(s["gradcam_stage"])), int(s["ig_steps"]), ex.black,
                                 seed, maps=(ex.gc[sub], ex.ig[sub]))
    else:
        rnd = {"gradcam": None, "integrated_gradients": None, "n": 0}
    rnd = {m: (None if isinstance(v, float) and np.isnan(v) else v) for m, v in rnd.items()}
    if maps_path is not None:
        np.savez_compressed(maps_path, index=ex.idx, gradcam=ex.gc.astype(np.float32), ig=ex.ig.astype(np.float32))
    return {
        "examples": [{"index": i, "label": classes[y[i]], "pred": classes[pred[i]], "correct": c}
                     for i, c in ex.examples],
        "gradcam_layer": _module_name(model, ex.layer),
        "ig_steps": int(s["ig_steps"]), "ig_baseline": "black image (pixel value 0)",
        "ig_mean_abs_convergence_delta": float(np.abs(ex.delta).mean()) if len(ex.delta) else None,
        "randomization_spearman": rnd,
        "randomization_passed": {m: (rnd[m] is not None and rnd[m] < 0.5) for m in ("gradcam", "integrated_gradients")},
    }


def attack_robustness(model, test, y: np.ndarray, s: dict, seed: int, chance: float) -> dict:
    """FGSM/PGD on a seeded stratified subsample, in normalized units bounded by the image range."""
    import torch

    from haven.learn.data import normalize

    mean, std = test.mean, test.std
    att = stratified_subsample(y, int(s["attack_samples"]), seed)
    xa = normalize(torch.from_numpy(read(test, att)), mean, std).numpy()
    shape = (-1,) + (1,) * (xa.ndim - 2)  # per channel: (C, 1, 1), or (C, 1, 1, 1) for volumes
    lo = ((0 - mean) / std).view(shape).numpy()
    hi = ((1 - mean) / std).view(shape).numpy()
    rob = robustness(model, xa, y[att], list(s["epsilons"]), lo, hi, int(s["pgd_steps"]))
    rob["chance"] = chance
    if xa.ndim == 5:
        rob["volume_note"] = (f"volumes: {len(att)} test volumes and {int(s['pgd_steps'])} PGD steps (capped for the "
                              "CPU, see volume_limits); whole volumes attacked")
    pixel = float(std.mean())
    rob["epsilon_pixel"] = [float(e) * pixel for e in rob["epsilons"]]
    rob["attack"] = ("untargeted L-inf FGSM and PGD from the adversarial-robustness-toolbox (ART) on the normalized "
                     "input, clipped to the image range; epsilon_pixel = epsilon x mean std (fraction of [0, 1])")
    return rob


def _figures(paths: dict[str, Path], metrics: dict, y: np.ndarray, probs: np.ndarray, classes: list[str], pos: int,
             s: dict, scaled: np.ndarray | None, pixel: float) -> None:
    """The summary figures (the attribution overlays are drawn with their maps)."""
    cal = metrics["calibration"]
    draw = {
        "confusion": lambda p: plots.plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, p),
        "roc": lambda p: plots.plot_roc(y, probs, classes, p, pos),
        "pr": lambda p: plots.plot_pr(y, probs, classes, p, pos),
        "reliability": lambda p: plots.plot_reliability(probs, y, p, int(s["calibration_bins"]), scaled,
                                                        cal.get("temperature")),
        "subgroups": lambda p: plots.plot_subgroups(metrics["subgroups"], p),
        "robustness": lambda p: plots.plot_robustness(metrics["robustness"], p, pixel),
    }
    for kind, fn in draw.items():
        if kind in paths:
            fn(paths[kind])


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The scalars logged to MLflow (prefixed ``test_``)."""
    out: dict[str, float] = {}

    def put(name, v):
        put_scalar(out, name, v)

    for k in ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc"):
        put(k, metrics.get(k))
        ci = (metrics.get("ci") or {}).get(k)
        if ci:
            put(f"{k}_ci_low", ci[0])
            put(f"{k}_ci_high", ci[1])
    for c, v in metrics.get("per_class", {}).items():
        safe = safe_name(c)
        put(f"sensitivity_{safe}", v.get("sensitivity"))
        put(f"specificity_{safe}", v.get("specificity"))
    put_trust_scalars(out, metrics)
    for m, v in (metrics.get("explain", {}).get("randomization_spearman") or {}).items():
        if m in ("gradcam", "integrated_gradients"):
            put(f"randomization_spearman_{m}", v)
    for k in TTA_METRICS:
        put(f"tta_{k}", ((metrics.get("tta") or {}).get(k) or {}).get("with"))
    rob = metrics.get("robustness", {})
    for attack in ("fgsm", "pgd"):
        for e, acc in zip(rob.get("epsilons", []), rob.get(attack, [])):
            put(f"{attack}_accuracy_eps_{e:g}", acc)
    return out
