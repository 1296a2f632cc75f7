"""Segmentation's evaluation (the evaluate stage's body for ``task: segmentation``; the numbers
on plain arrays are :mod:`haven.trust.segmetrics`, the overlays :mod:`haven.trust.segplots`).

A volume store (masks (N, D, H, W), model.pt ``dims: 3``) is evaluated the same way, a case being a
volume: predicted by sliding windows of the training patch, HD95 in mm (the store's spacing),
overlays of the middle slices, the attack on fewer volumes and steps (:mod:`haven.trust.volume`).

A segmentation predicts a class per pixel (the argmax of its softmax, no tuned threshold); each
trust question is asked of that:

performance
    per case (image) and foreground class Dice, IoU and HD95 (pixels), their means with
    patient-level bootstrap intervals (segmetrics' empty-mask conventions: a clean negative
    scores Dice 1, HD95 is undefined with an empty side), the Dice of predicting all background
    (``all_background_dice``: what a model that finds nothing scores, the chance line), the pixel
    confusion matrix, and the image-level view: a structure is *present* when the true mask has a
    foreground pixel, *called* when the predicted mask has at least ``segmentation.
    threshold_pixels`` (a speck is noise), ranked by the highest foreground pixel probability (ROC
    AUC, sensitivity, specificity).  ``metrics["val"]`` holds the same on the validation split,
    so the two can be compared (test far below validation: the checkpoint choice overfitted it,
    or the splits differ).
calibration
    of the pixel probabilities on a seeded sample of ``PIXEL_SAMPLE`` test pixels (top-label ECE,
    Brier, NLL, the reliability diagram), temperature scaling fitted on a validation pixel sample;
    it never changes a mask.  Background pixels dominate any uniform sample, as they dominate the
    images.
bias
    Dice, IoU, HD95 and the image-level view per subgroup of sex, age band and site; gaps
    between groups of at least ``min_group_size`` images in ``GAP_METRICS`` (the settings'
    ``gap_metrics`` name classification metrics), flagged above ``gap_threshold``: the Dice of
    images showing a structure and the specificity of the clean ones.  Not the mean Dice over
    all images: clean negatives score 1, so a group with fewer lesions would look better at
    the same skill.  The subgroup table has classification's long layout (attribute, group,
    metric, value).
interpretability
    the overlays are the explanation: where the model puts each class, beside the truth, for the
    worst and best cases by Dice and a seeded sample.  Grad-CAM and Integrated Gradients explain
    one class score of a classifier and are drawn as panels saying so; ``explain_maps`` holds the
    foreground probability maps of the overlay cases.
robustness
    untargeted L-inf FGSM and PGD on the normalized input, clipped to the image range, on up to
    ``ATTACK_CASES`` seeded test images (lesion and clean in turn), maximizing the pixel
    cross-entropy: the mean foreground Dice at each epsilon.  Written with torch autograd (ART's
    attacks take a classifier's one label per image).
predictions
    the softmax probabilities (N, K, H, W float32) are too big to keep: the ``.npz`` holds the
    argmax ``masks`` and ``truth`` (N, H, W uint8), per-case ``dice``/``iou``/``hd95`` (N, K-1,
    NaN where undefined), the image-level ``present``/``score``/``called`` and ``classes``.

Test-time augmentation is not applied: its flipped views' masks would have to be flipped back,
which :mod:`haven.learn.tta` (made for image-level scores) does not do.
"""

from __future__ import annotations

import numpy as np

from haven.trust import plots, segplots
from haven.trust.calibration import calibration
from haven.trust.context import Context, column, patient_clusters, put_scalar, put_trust_scalars, read, safe_name
from haven.trust.segmetrics import METRICS, case_metrics, lesion_view, segmentation_metrics
from haven.trust.subgroups import add_attribute, attribute_groups
from haven.trust.volume import SLICES, capped, is_volume, mid_slices, spacing

__all__ = ["evaluate", "flat_metrics"]

PIXEL_SAMPLE = 200_000  # pixels drawn for calibration: ECE's bins are well filled, the fit quick
ATTACK_CASES = 16  # a U-Net's backward pass on full images is costly on the evaluate stage's CPU
OVERLAY_CASES = 8
# prevalence-free: quality where there is a structure, false alarms where there is none
GAP_METRICS = ("dice_present", "specificity")
NOT_EXPLAINED = ("{name} explains one class score of an image classifier. A segmentation's per-pixel "
                 "prediction is its own explanation: the overlays figure shows where the model puts each class "
                 "beside the truth, and explain_maps holds the foreground probability maps of those cases.")


def evaluate(ctx: Context) -> dict:
    """Every segmentation metric of metrics.json and every file of ``ctx.outputs`` (see the
    module docstring)."""
    test, lap, classes = ctx.test, ctx.lap, ctx.classes
    s, limits = capped(ctx.settings, is_volume(test))  # a volume is attacked on fewer cases and steps
    scores, y = ctx.predict(test)
    _check(scores, y, classes, test)
    min_pixels = int(getattr(ctx.task, "options", {}).get("threshold_pixels") or 10)
    metrics = split_metrics(y, scores, classes, patient_clusters(test), s, ctx.seed, min_pixels, spacing(test))
    metrics.update(classes=classes, threshold_pixels=min_pixels, pixel_confusion_matrix=pixel_confusion(y, scores),
                   hd95_unit="mm" if spacing(test) else "pixels")
    if is_volume(test):
        metrics["volume_limits"] = limits
    val = ctx.predict(ctx.val) if ctx.val is not None else None
    if val is not None:
        _check(*val, classes, ctx.val)
        metrics["val"] = {k: v for k, v in split_metrics(val[1], val[0], classes, patient_clusters(ctx.val), s,
                                                          ctx.seed, min_pixels, spacing(ctx.val)).items()
                          if k != "cases"}
    if ctx.tta and ctx.tta.get("enabled"):
        metrics["tta_skipped"] = ("test-time augmentation is not applied to segmentation: a flipped view's mask "
                                  "would have to be flipped back, which the TTA views do not do")
    lap("metrics")

    pix_p, pix_y, scaled = _pixel_calibration(metrics, scores, y, val, s, ctx.seed)
    metrics["decision"] = _decision(classes, min_pixels)
    lap("calibration")

    cases = {m: np.array([[np.nan if v is None else v for v in row] for row in metrics["cases"][m]], dtype=float)
             .reshape(len(y), len(classes) - 1) for m in METRICS}
    present, score, called = lesion_view(y, scores, min_pixels)
    metrics["subgroups"] = subgroups(test, y, cases, present, score, called, s, ctx.outputs.subgroups_table)
    lap("subgroups")

    dice = _case_mean(cases["dice"])
    shown = segplots.pick_cases(dice, OVERLAY_CASES, ctx.seed)
    metrics["explain"] = _explain_maps(ctx.outputs.explain_maps, scores, shown)
    lap("explain")

    metrics["robustness"] = attack_dice(ctx, y, present, s)
    lap("robustness")

    pred = scores.argmax(1).astype(np.uint8)
    _figures(ctx, metrics, (y, pred, scores, dice, shown), (present, score), (pix_p, pix_y, scaled))
    _save_predictions(ctx.outputs.predictions, pred, y, cases, (present, score, called), classes)
    metrics["tables"] = tables(metrics)
    lap("plots")
    return metrics


def _check(scores: np.ndarray, y: np.ndarray, classes: list[str], split) -> None:
    if np.ndim(y) not in (3, 4) or np.ndim(scores) != np.ndim(y) + 1:
        raise ValueError(f"{split.store}: a segmentation evaluates masks, but the split's targets have shape "
                         f"{np.shape(y)} and the scores {np.shape(scores)}; rerun preprocess with task: segmentation "
                         "(its stores carry the masks, attribute targets='masks')")
    if scores.shape[1] != len(classes) or scores.shape[2:] != y.shape[1:]:
        raise ValueError(f"{split.store}: the model gives {scores.shape[1]} class maps of {scores.shape[2:]} for "
                         f"{len(classes)} classes ({', '.join(classes)}) and masks of {y.shape[1:]}: the model and "
                         "the preprocess stores come from different runs; retrain or rerun preprocess")


def _case_mean(per_class: np.ndarray) -> np.ndarray:
    """Mean over foreground classes per case (NaN where every class is undefined)."""
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(per_class)
        return np.where(ok.any(1), np.where(ok, per_class, 0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)


def split_metrics(y: np.ndarray, scores: np.ndarray, classes: list[str], clusters, s: dict, seed: int,
                  min_pixels: int, voxel_mm: list[float] | None = None) -> dict:
    """segmetrics' pixel metrics and image-level view of one split with its bootstrap intervals
    (none when ``bootstrap`` is 0), and the Dice of predicting all background.  ``voxel_mm``: a
    volume store's spacing, so that HD95 is in mm (None: in pixels, a 2D store's)."""
    boot = int(s["bootstrap"])
    out = segmentation_metrics(y, scores, classes, clusters, n_resamples=max(boot, 1), level=float(s["ci_level"]),
                               seed=seed, spacing=voxel_mm, min_pixels=min_pixels)
    if not boot:
        out.pop("ci")
        out["image_level"].pop("ci")
    out["all_background_dice"] = split_background_dice(y, len(classes))
    return out


def split_background_dice(y: np.ndarray, k: int) -> float | None:
    """The mean foreground Dice of predicting all background: 1 on a case without the class, 0 on
    one with it (the chance line a model must beat)."""
    if not len(y):
        return None
    fg = np.stack([(y.reshape(len(y), -1) == c).any(1) for c in range(1, k)], 1)
    return float((~fg).mean(1).mean())


def pixel_confusion(y: np.ndarray, scores: np.ndarray) -> list[list[int]]:
    """K x K pixel counts over the split, rows the true class, columns the predicted."""
    k = scores.shape[1]
    pred = scores.argmax(1).astype(np.int64).ravel()
    return np.bincount(y.astype(np.int64).ravel() * k + pred, minlength=k * k).reshape(k, k).tolist()


def pixel_sample(scores: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, K) probabilities and (n,) true classes of ``n`` seeded pixels drawn over the whole split
    (every pixel when it holds fewer)."""
    total = y.size
    rng = np.random.default_rng(seed)
    flat = np.arange(total) if total <= n else rng.choice(total, size=n, replace=False)
    at = np.unravel_index(flat, y.shape)  # (case, row, col) or (case, d, h, w)
    return np.asarray(np.moveaxis(scores, 1, -1)[at], dtype=np.float64), y[at].astype(np.int64)


def _pixel_calibration(metrics: dict, scores, y, val, s: dict, seed: int):
    """metrics["calibration"] of a test pixel sample, scaled by a temperature fitted on a
    validation pixel sample; returns (sample probabilities, sample classes, scaled or None)."""
    pix_p, pix_y = pixel_sample(scores, y, PIXEL_SAMPLE, seed)
    vs = pixel_sample(val[0], val[1], PIXEL_SAMPLE, seed) if val is not None and s["temperature_scaling"] else None
    cal, scaled = calibration(pix_p, pix_y, int(s["calibration_bins"]), vs)
    cal.update(unit="pixel", pixels=int(len(pix_y)),
               note=f"a seeded sample of {len(pix_y)} test pixels; the masks always use the model's own "
                    "probabilities (argmax, unchanged by a temperature)")
    metrics["calibration"] = cal
    return pix_p, pix_y, scaled


def _decision(classes: list[str], min_pixels: int) -> dict:
    fg = ", ".join(classes[1:])
    return {"rule": "argmax", "threshold_pixels": int(min_pixels), "chosen_on": None, "calibrated": False,
            "text": (f"Each pixel takes its most probable class (the argmax of the model's probabilities; no threshold "
                     f"is tuned). An image is called to show a structure ({fg}) when at least {min_pixels} of its "
                     "pixels are predicted foreground (segmentation.threshold_pixels).")}


def _mean(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def _group_values(dice, iou, hd, lesion, present, score, called) -> dict:
    """One subgroup's figures from its cases' arrays."""
    from sklearn.metrics import roc_auc_score

    pos, neg = present == 1, present == 0
    return {"n": int(len(dice)), "dice": _mean(dice), "dice_present": _mean(lesion), "iou": _mean(iou),
            "hd95": _mean(hd), "n_present": int(pos.sum()),
            "sensitivity": float(called[pos].mean()) if pos.any() else None,
            "specificity": float(1 - called[neg].mean()) if neg.any() else None,
            "roc_auc": float(roc_auc_score(present, score)) if pos.any() and neg.any() else None}


def _gaps(groups: dict, eligible: list[str]) -> dict:
    gaps = {}
    for m in GAP_METRICS:
        vals = {g: groups[g][m] for g in eligible if groups[g][m] is not None}
        if len(vals) < 2:
            continue
        best, worst = max(vals, key=vals.get), min(vals, key=vals.get)
        gaps[m] = {"gap": vals[best] - vals[worst], "best": best, "worst": worst, "best_value": vals[best],
                   "worst_value": vals[worst]}
    return gaps


def subgroups(test, y: np.ndarray, cases: dict, present: np.ndarray, score: np.ndarray, called: np.ndarray, s: dict,
              table_path) -> dict:
    """The subgroup audit of Dice (the same record as classification's, :mod:`haven.trust.subgroups`:
    groups, eligible groups, gaps, the largest, the flag; ``gap_metrics`` :data:`GAP_METRICS`);
    writes the long table attribute/group/metric/value to ``table_path``."""
    import pandas as pd

    dice, iou, hd = (_case_mean(cases[m]) for m in METRICS)
    lesion = np.where(present == 1, dice, np.nan)
    min_n, gap_threshold = int(s["min_group_size"]), float(s["gap_threshold"])
    out: dict = {"threshold": gap_threshold, "min_group_size": min_n, "positive_class": None,
                 "gap_metrics": list(GAP_METRICS), "metric_note": "dice: mean foreground Dice per image; dice_present: over images showing a "
                 "structure; sensitivity, specificity, roc_auc: the image-level view", "attributes": {}, "skipped": {}, "largest_gap": None,
                 "flagged": False}
    rows = []
    for attr in s["subgroups"]:
        values, why = attribute_groups(column(test, attr), len(y))
        if values is None:
            out["skipped"][attr] = why
            continue
        groups = {}
        for g in np.unique(values):
            m = values == g
            groups[str(g)] = _group_values(dice[m], iou[m], hd[m], lesion[m], present[m], score[m], called[m])
            rows += [{"attribute": attr, "group": str(g), "metric": k, "value": v} for k, v in groups[str(g)].items()]
        eligible = [g for g, v in groups.items() if v["n"] >= min_n and g != "unknown"]
        add_attribute(out, attr, groups, _group_values(dice, iou, hd, lesion, present, score, called), eligible,
                      _gaps(groups, eligible), gap_threshold)
    out["flagged_attributes"] = [a for a, e in out["attributes"].items() if e["flagged"]]
    if table_path is not None:
        pd.DataFrame(rows, columns=["attribute", "group", "metric", "value"]).to_csv(table_path, index=False)
    return out


def _explain_maps(path, scores: np.ndarray, shown: list[int]) -> dict:
    """The foreground probability maps of the overlay cases (``explain_maps``) and the record."""
    fg = (1.0 - scores[shown, 0]).astype(np.float16) if len(shown) else np.zeros((0,) + scores.shape[2:], np.float16)
    if path is not None:
        np.savez_compressed(path, index=np.asarray(shown, dtype=np.int64), foreground_probability=fg)
    return {"method": "overlays", "cases": [int(i) for i in shown],
            "note": "the overlays (true contour, predicted fill) are the explanation; Grad-CAM and Integrated "
                    "Gradients explain a classifier's class score and are not computed"}


def _attack(model, x, t, eps: float, steps: int, lo, hi):
    """Untargeted L-inf attack on the pixel cross-entropy: one step of ``eps`` (FGSM, steps=1) or
    ``steps`` of 2.5 eps / steps projected onto the eps-ball (PGD, no random start)."""
    import torch

    if eps <= 0:
        return x
    step = eps if steps == 1 else 2.5 * eps / steps
    adv = x.clone()
    with torch.enable_grad():
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(adv).float(), t)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step * grad.sign()
            adv = torch.max(torch.min(adv, x + eps), x - eps)
            adv = torch.max(torch.min(adv, hi), lo)
    return adv.detach()


def _attacked_dice(model, x, t, classes: list[str], eps: float, steps: int, lo, hi, batch: int = 8) -> float:
    """Mean foreground Dice of the masks on the attacked images."""
    import torch

    preds = []
    for b in range(0, len(x), batch):
        adv = _attack(model, x[b:b + batch], t[b:b + batch], eps, steps, lo, hi)
        with torch.no_grad():
            preds.append(model(adv).argmax(1).numpy())
    dice = case_metrics(t.numpy(), np.concatenate(preds), classes)["dice"]
    return float(np.mean(_case_mean(dice)))


def attack_dice(ctx: Context, y: np.ndarray, present: np.ndarray, s: dict) -> dict:
    """metrics["robustness"]: mean foreground Dice under FGSM and PGD at each of the settings'
    ``epsilons`` (normalized input units, bounded by the image range) on a seeded subsample."""
    import torch

    from haven.learn.data import normalize
    from haven.trust.robustness import stratified_subsample

    from haven.learn.infer import logits_of

    test, classes = ctx.test, ctx.classes
    idx = stratified_subsample(present, min(int(s["attack_samples"]), ATTACK_CASES), ctx.seed)
    x = normalize(torch.from_numpy(read(test, idx)), test.mean, test.std)
    t = torch.as_tensor(y[idx].astype(np.int64))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    lo, hi = ((0 - test.mean) / test.std).view(shape), ((1 - test.mean) / test.std).view(shape)
    eps, steps = [float(e) for e in s["epsilons"]], int(s["pgd_steps"])
    model = ctx.model.eval()
    if x.ndim == 5:  # a volume: the attack differentiates through the sliding windows prediction reads it by
        net, patch = model, ctx.meta.get("patch")
        model = lambda v: logits_of(net, v, "off", patch)  # noqa: E731
    out = {"metric": "dice", "n": int(len(idx)), "epsilons": eps, "pgd_steps": steps,
           "epsilon_pixel": [e * float(test.std.mean()) for e in eps],
           "clean_dice": _attacked_dice(model, x, t, classes, 0.0, 1, lo, hi) if len(idx) else None,
           "all_background_dice": split_background_dice(y[idx], len(classes)),
           "attack": ("untargeted L-inf FGSM and PGD on the pixel cross-entropy, on the normalized input clipped to "
                      "the image range; epsilon_pixel = epsilon x mean std (fraction of [0, 1])")}
    for attack, n_steps in (("fgsm", 1), ("pgd", steps)):
        out[attack] = [_attacked_dice(model, x, t, classes, e, n_steps, lo, hi) if len(idx) else None for e in eps]
    return out


def _overlays(ctx: Context, y, pred, dice, shown, path) -> None:
    images = read(ctx.test, np.asarray(shown, dtype=int))
    titles = [("Dice –" if not np.isfinite(dice[i]) else f"Dice {dice[i]:.2f}")
              + ("" if (y[i] > 0).any() else " (none)") for i in shown]
    if images.ndim == 5:  # volumes: their middle slices (haven.trust.volume.mid_slices), three per panel
        segplots.plot_overlays(mid_slices(images), mid_slices(y[shown]), mid_slices(pred[shown]), path, titles,
                               ctx.classes, cols=2, title=f"segmentation: true contour, predicted fill\n({SLICES})",
                               panel=(4.6, 1.9))
        return
    segplots.plot_overlays(images, y[shown], pred[shown], path, titles, ctx.classes)


def _curve(kind: str, present: np.ndarray, score: np.ndarray, path) -> None:
    """The image-level view's ROC or PR curve, or a panel saying why there is none."""
    if 0 < present.sum() < len(present):
        draw = plots.plot_roc if kind == "roc" else plots.plot_pr
        draw(present, np.stack([1 - score, score], 1), ["none", "structure present"], path, 1)
    else:
        segplots.plot_note(path, f"{kind.upper()}: image-level view not drawn",
                           "every test image " + ("shows" if present.all() else "lacks") + " a structure: the "
                           "view 'structure present' needs images of both kinds")


def _figures(ctx: Context, metrics: dict, masks: tuple, view: tuple, pixels: tuple) -> None:
    """Every figure ``ctx.outputs.plots`` names, each the segmentation counterpart of its kind or
    a panel saying why it does not apply."""
    y, pred, scores, dice, shown = masks
    present, score = view
    pix_p, pix_y, scaled = pixels
    s, cal, classes = ctx.settings, metrics["calibration"], ctx.classes
    draw = {
        "overlays": lambda p: _overlays(ctx, y, pred, dice, shown, p),
        "confusion": lambda p: plots.plot_confusion(np.asarray(metrics["pixel_confusion_matrix"]), classes, p),
        "roc": lambda p: _curve("roc", present, score, p),
        "pr": lambda p: _curve("pr", present, score, p),
        "reliability": lambda p: plots.plot_reliability(pix_p, pix_y, p, int(s["calibration_bins"]), scaled,
                                                        cal.get("temperature")),
        "subgroups": lambda p: plots.plot_subgroups(metrics["subgroups"], p),
        "gradcam": lambda p: segplots.plot_note(p, "Grad-CAM: not computed for segmentation",
                                                NOT_EXPLAINED.format(name="Grad-CAM")),
        "integrated_gradients": lambda p: segplots.plot_note(p, "Integrated Gradients: not computed for segmentation",
                                                             NOT_EXPLAINED.format(name="Integrated Gradients")),
        "robustness": lambda p: segplots.plot_attack(metrics["robustness"], p, float(ctx.test.std.mean())),
    }
    for kind, path in ctx.outputs.plots.items():
        draw[kind](path)


def _save_predictions(path, pred, y, cases: dict, view: tuple, classes: list[str]) -> None:
    """The test masks and per-case metrics (see the module docstring: not the probabilities)."""
    if path is None:
        return
    present, score, called = view
    np.savez_compressed(path, masks=pred, truth=y.astype(np.uint8), present=present, score=score.astype(np.float32),
                        called=called, classes=np.asarray(classes),
                        **{m: cases[m].astype(np.float32) for m in METRICS})


DIGITS = {"hd95": 1}  # HD95 in pixels (mm for volumes: metrics["hd95_unit"]); the others are fractions


def _cell(v, ci=None, digits: int = 3) -> str:
    if v is None:
        return "–"
    text = f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def tables(metrics: dict) -> list[dict]:
    """The report's segmentation tables (``metrics["tables"]``): overlap per class with intervals,
    and validation beside test."""
    ci = metrics.get("ci") or {}
    unit_hd = metrics.get("hd95_unit", "pixels")
    level = f"{round(100 * ci['level'])} %" if ci else "no"
    per_ci = ci.get("per_class") or {}
    rows = [["mean of the foreground classes", _cell(metrics["dice"], ci.get("dice")),
             _cell(metrics["dice_present"], ci.get("dice_present")), _cell(metrics["iou"], ci.get("iou")),
             _cell(metrics["hd95"], ci.get("hd95"), 1), metrics["hd95_undefined"]]]
    for c, v in metrics["per_class"].items():
        pc = per_ci.get(c) or {}
        rows.append([c, _cell(v["dice"], pc.get("dice")), _cell(v["dice_present"], pc.get("dice_present")),
                     _cell(v["iou"], pc.get("iou")), _cell(v["hd95"], pc.get("hd95"), 1), v["hd95_undefined"]])
    val = metrics.get("val") or {}
    il, vil = metrics["image_level"], val.get("image_level") or {}
    ilci = il.get("ci") or {}
    compare = [[name, _cell(val.get(k), None, DIGITS.get(k, 3)), _cell(metrics[k], ci.get(k), DIGITS.get(k, 3))]
               for k, name in (("dice", "mean Dice"), ("dice_present", "Dice, images showing a structure"),
                               ("iou", "mean IoU"), ("hd95", f"HD95 ({unit_hd})"))]
    compare += [[f"image level: {name}", _cell(vil.get(k)), _cell(il[k], ilci.get(k))]
                for k, name in (("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"))]
    compare.append(["predicting all background: mean Dice", _cell(val.get("all_background_dice")),
                    _cell(metrics["all_background_dice"])])
    unit = ci.get("unit", "patient")
    return [
        {"title": "Segmentation overlap (test split)",
         "header": ["class", f"Dice [{level} CI]", "Dice, images showing it", "IoU", f"HD95 ({unit_hd})",
                    "HD95 undefined"],
         "rows": rows, "note": (f"Per image, then averaged. An image without the class scores Dice and IoU 1 when "
                                f"nothing is predicted, 0 otherwise; HD95 is undefined (left out) when the truth or "
                                f"the prediction is empty. Intervals: percentile bootstrap over "
                                f"{ci.get('resamples', 0)} resamples of {unit}s.")},
        {"title": "Validation and test", "header": ["metric", "validation", "test"], "rows": compare,
         "note": (f"Image level: a structure is present when the true mask has a foreground pixel, called when at "
                  f"least {metrics['threshold_pixels']} pixels are predicted foreground, ranked by the highest "
                  f"foreground pixel probability. Test far below validation means the checkpoint choice "
                  f"overfitted the validation split or the splits differ."
                  + ("" if val else " No validation split was evaluated."))},
    ]


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The scalars logged to MLflow (prefixed ``test_``): mean and per-class Dice, IoU, HD95 and
    lesion Dice (with the mean's interval), the image-level view (``lesion_*``), pixel
    calibration, the subgroup gap and Dice under attack."""
    out: dict[str, float] = {}

    def put(name, v):
        put_scalar(out, name, v)

    ci = metrics.get("ci") or {}
    for m in (*METRICS, "dice_present"):  # named as in metrics.json (the means) and the registry's tags
        put(m, metrics.get(m))
        if ci.get(m):
            put(f"{m}_ci_low", ci[m][0])
            put(f"{m}_ci_high", ci[m][1])
        for c, v in (metrics.get("per_class") or {}).items():
            put(f"{m}_{safe_name(c)}", v.get(m))
    il = metrics.get("image_level") or {}
    for k in ("roc_auc", "sensitivity", "specificity"):
        put(f"lesion_{k}", il.get(k))
    put("all_background_dice", metrics.get("all_background_dice"))
    put_trust_scalars(out, metrics)
    rob = metrics.get("robustness", {})
    put("robustness_clean_dice", rob.get("clean_dice"))
    for attack in ("fgsm", "pgd"):
        for e, d in zip(rob.get("epsilons", []), rob.get(attack, [])):
            put(f"{attack}_dice_eps_{e:g}", d)
    return out
