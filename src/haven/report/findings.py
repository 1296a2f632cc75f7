"""The findings as rows and sentences, shared by the page and the model card.

Everything here turns an upstream artefact (``stats.json``, ``metrics.json``, ``audit.json``,
``trials.csv``) into plain text cells or notes; the templates only lay them out, so the page and
the card can never state a number differently.
"""

from __future__ import annotations

import pandas as pd


def fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))


def ci(v, interval) -> str:
    """``0.958 [0.936, 0.979]``, or just the value when there is no interval."""
    if v is None:
        return "–"
    return f"{fmt(v)} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else fmt(v)


def split_rows(stats: dict) -> list[tuple]:
    """split, images, patients, per class."""
    return [(name, stats["samples"][name], stats["patients"][name],
             ", ".join(f"{k}: {v}" for k, v in stats["per_class"][name].items())) for name in stats["samples"]]


def pixel_text(audit: dict) -> str:
    """The audit's OCR of burned-in text, when it read any pixels."""
    # older audits carry no OCR counts: nothing read, nothing said
    read, not_read = audit.get("pixel_text_read", 0), audit.get("pixel_text_not_read", 0)
    if not read and not not_read:
        return ""
    return f"; burned-in text read by OCR in {read} file(s)" + (f", {not_read} not readable" if not_read else "")


def accepted_rows(audit: dict) -> list[tuple]:
    """The findings the project's reviewers accepted as not PHI: (place, reason, who, when, findings);
    audit.json holds no value, so neither does the page."""
    return [(e.get("place", ""), e.get("reason", ""), e.get("accepted_by", ""), e.get("accepted_on", ""),
             e.get("findings", "")) for e in audit.get("accepted", {}).get("entries", [])]


def trials_table(trials: pd.DataFrame | None, top: int = 8) -> tuple[list[tuple], tuple] | None:
    """The ``top`` trials by the validation metric: (rows, header), or None without trials."""
    if trials is None or trials.empty:
        return None
    df = trials
    metric = next((c for c in ("val_qwk", "val_macro_roc_auc", "val_balanced_accuracy", "val_accuracy") if c in df),
                  None)
    if metric:
        df = df.sort_values(metric, ascending=False)
    cols = [c for c in df.columns if c.startswith("param_")] + [c for c in (metric, "training_iteration") if c]
    rows = [tuple(fmt(v) if isinstance(v, float) else v for v in r) for r in df[cols].head(top).itertuples(index=False)]
    return rows, tuple(c.removeprefix("param_") for c in cols)


def cv_table(run: dict) -> tuple[list[tuple], tuple, str]:
    """A cross-validated model's folds (rows, header, note: mean ± sd), from its run.json; empty
    for a single model."""
    cv = run.get("cv")
    if not cv:
        return [], (), ""
    key = f"best_{cv['metric']}"
    rows = [(f["fold"], f["best_epoch"], fmt(f[key]), f["epochs_run"]) for f in cv["per_fold"]]
    note = (f"{cv['folds']}-fold cross-validation by patient: {cv['metric']} {cv['mean']:.3f} ± {cv['sd']:.3f} "
            f"(mean ± sd over the folds, each fold validated on its own patients). The model evaluated below is "
            f"the ensemble of the {cv['folds']} fold networks (averaged probabilities).")
    return rows, ("fold", "best epoch", key, "epochs"), note


def task_tables(metrics: dict) -> list[dict]:
    """The tables a task's evaluation adds to metrics.json (``tables``: title, header, rows, note;
    multi-label per-finding figures, ordinal kappa and grades), as text cells."""
    return [{"title": str(t.get("title", "")), "header": [str(h) for h in t.get("header", [])],
             "rows": [[fmt(c) for c in r] for r in t.get("rows", [])], "note": str(t.get("note", ""))}
            for t in metrics.get("tables") or []]


def task_text(task: str, stats: dict) -> str:
    """What the model does, for the model card's intended use."""
    from haven.learn.tasks import get_task

    return get_task(task).describe(list(stats["classes"]))


def metric_rows(metrics: dict) -> list[tuple]:
    intervals = metrics.get("ci") or {}
    rows = [("n (test images)", metrics["n"])]
    for key, name in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC AUC"),
                      ("pr_auc", "PR AUC (average precision)")):
        if key in metrics:  # a task without the figure (a segmentation) gives its own tables instead
            rows.append((name, ci(metrics.get(key), intervals.get(key))))
    if "chance_accuracy" in metrics:
        rows.append(("chance (majority class)", fmt(metrics.get("chance_accuracy"))))
    return rows


def per_class_rows(metrics: dict) -> list[tuple]:
    intervals = (metrics.get("ci") or {}).get("per_class", {})
    return [(c, ci(v.get("sensitivity"), intervals.get(c, {}).get("sensitivity")),
             ci(v.get("specificity"), intervals.get(c, {}).get("specificity"))) for c, v in metrics.get("per_class", {}).items()
            if "sensitivity" in v or "specificity" in v]


def ci_note(metrics: dict) -> str:
    intervals = metrics.get("ci")
    if not intervals:
        return "No confidence intervals (evaluate.bootstrap = 0)."
    unit = "patients (all slices of a patient together)" if intervals["unit"] == "patient" else "images"
    return (f"[low, high]: {round(100 * intervals['level'])} % percentile bootstrap intervals over "
            f"{intervals['resamples']} resamples of {unit}.")


def calibration_rows(cal: dict) -> list[tuple]:
    return [("expected calibration error (ECE)", fmt(cal.get("ece")), fmt(cal.get("ece_scaled"))),
            ("Brier score", fmt(cal.get("brier")), fmt(cal.get("brier_scaled"))),
            ("negative log-likelihood", fmt(cal.get("nll")), fmt(cal.get("nll_scaled")))]


def calibration_note(cal: dict) -> str:
    if cal.get("temperature") is None:
        return f"ECE over {cal.get('bins')} equal-width confidence bins; no temperature scaling."
    return (f"ECE over {cal['bins']} equal-width confidence bins. Temperature scaling fitted on the validation split "
            f"(n = {cal.get('val_n')}): T = {cal['temperature']:.2f} ({'over' if cal['temperature'] > 1 else 'under'}"
            f"confident model); it rescales the probabilities and never changes a prediction.")


def metric_label(sg: dict, m: str) -> str:
    """``sensitivity (hemorrhage)`` for binary projects: whose sensitivity it is."""
    return f"{m} ({sg['positive_class']})" if m in ("sensitivity", "specificity") and sg.get("positive_class") else m


def subgroup_rows(sg: dict) -> list[tuple]:
    """attribute, group, n, the gap metrics, ROC AUC, in the gap?"""
    rows = []
    for attr, e in sg.get("attributes", {}).items():
        for g, v in e["groups"].items():
            rows.append((attr, g, v.get("n"), *[fmt(v.get(m)) for m in sg["gap_metrics"]], fmt(v.get("roc_auc")),
                         "yes" if g in e["eligible_groups"] else "no (small or unknown)"))
    return rows


def subgroup_header(sg: dict) -> tuple:
    """The header of :func:`subgroup_rows`: the gap metrics are the project's own."""
    return ("attribute", "group", "n", *[metric_label(sg, m) for m in sg.get("gap_metrics", [])], "ROC AUC",
            "in the gap")


def gap_rows(sg: dict) -> list[tuple]:
    rows = []
    for attr, e in sg.get("attributes", {}).items():
        for m, gp in e["gaps"].items():
            rows.append((attr, metric_label(sg, m), f"{gp['gap']:.3f}", f"{gp['best']} ({gp['best_value']:.3f})",
                         f"{gp['worst']} ({gp['worst_value']:.3f})",
                         "FLAGGED" if gp["gap"] > sg["threshold"] else "ok"))
    return rows


def subgroup_summary(sg: dict) -> str:
    parts = []
    lg = sg.get("largest_gap")
    if lg:
        parts.append(f"Largest gap: {lg['gap']:.3f} in {metric_label(sg, lg['metric'])} across {lg['attribute']} "
                     f"({lg['best']} {lg['best_value']:.3f} vs {lg['worst']} {lg['worst_value']:.3f}); "
                     f"threshold {sg['threshold']:.2f}: "
                     + (f"FLAGGED ({', '.join(sg['flagged_attributes'])})." if sg["flagged"] else "not exceeded."))
    elif sg.get("attributes"):
        parts.append("No subgroup gap could be computed (fewer than two groups large enough).")
    else:
        parts.append("No subgroup attribute could be audited.")
    if sg.get("attributes"):
        parts.append(f"Groups with fewer than {sg['min_group_size']} test images, and unknown values, are shown "
                     "but left out of the gaps.")
    for attr, reason in sg.get("skipped", {}).items():
        parts.append(f"{attr}: not audited, {reason}.")
    return " ".join(parts)


def explain_summary(ex: dict) -> str:
    r = ex.get("randomization_spearman") or {}
    passed = ex.get("randomization_passed") or {}

    def one(m, name):
        v = r.get(m)
        if v is None:
            return f"{name}: not computed"
        return f"{name} ρ = {v:.2f} ({'passed' if passed.get(m) else 'FAILED'}: maps {'change' if passed.get(m) else 'barely change'} with the weights)"

    return (f"Model-randomization test on {r.get('n', 0)} explained images (Spearman rank correlation between the maps "
            f"of the trained and of a re-initialized network; ρ < 0.5 passes): {one('gradcam', 'Grad-CAM')}; "
            f"{one('integrated_gradients', 'Integrated Gradients')}. Grad-CAM at {ex.get('gradcam_layer')}; "
            f"IG with {ex.get('ig_steps')} steps from a {ex.get('ig_baseline')}.")


def robustness_rows(rob: dict) -> list[tuple]:
    rows = []
    for i, e in enumerate(rob.get("epsilons", [])):
        fci, pci = (rob.get("fgsm_ci") or [None] * (i + 1))[i], (rob.get("pgd_ci") or [None] * (i + 1))[i]
        rows.append((f"{e:g}", f"{rob['epsilon_pixel'][i] * 255:.2f}" if rob.get("epsilon_pixel") else "–",
                     ci(rob["fgsm"][i], fci), ci(rob["pgd"][i], pci)))
    return rows


def robustness_note(rob: dict) -> str:
    return (f"Untargeted L-inf attacks (adversarial-robustness-toolbox) on {rob.get('n')} class-stratified test images "
            f"(clean accuracy {fmt(rob.get('clean_accuracy'))}); PGD {rob.get('pgd_steps')} steps. Epsilon in "
            "normalized pixel units (the network input), also as 8-bit grey levels (ε × std × 255); "
            "95 % Wilson intervals.")


def limitations(stats: dict, metrics: dict) -> list[str]:
    """Limitations stated from the findings, not boilerplate only."""
    out = []
    interval = (metrics.get("ci") or {}).get("balanced_accuracy")
    if interval:
        out.append(f"Test set of {metrics['n']} images / {stats['patients']['test']} patients: balanced accuracy is "
                   f"known only to within [{interval[0]:.3f}, {interval[1]:.3f}].")
    cal = metrics.get("calibration", {})
    if cal.get("ece") is not None and cal["ece"] > 0.05:
        after = f"; {cal['ece_scaled']:.3f} after temperature scaling" if cal.get("ece_scaled") is not None else ""
        out.append(f"Probabilities are miscalibrated (ECE {cal['ece']:.3f}{after}); do not read them as risks.")
    sg = metrics.get("subgroups", {})
    for attr in sg.get("flagged_attributes", []):
        lg = sg["attributes"][attr]["largest_gap"]
        out.append(f"Performance differs across {attr}: {metric_label(sg, lg['metric'])} gap {lg['gap']:.3f} "
                   f"({lg['worst']} worst), above the {sg['threshold']:.2f} threshold.")
    if sg.get("skipped"):
        out.append("Not audited for bias across " + ", ".join(sg["skipped"]) + " (the data carries no such value).")
    small = [f"{a} {g}" for a, e in sg.get("attributes", {}).items() for g in e["groups"] if g not in e["eligible_groups"]]
    if small:
        out.append("Too few test images to judge: " + ", ".join(small) + ".")
    ex = metrics.get("explain", {})
    failed = [m for m, ok in (ex.get("randomization_passed") or {}).items() if not ok]
    if failed:
        out.append("Saliency maps of " + " and ".join(m.replace("_", " ") for m in failed) + " barely change when the "
                   "weights are randomized: they reflect the input more than the model; do not use them as explanations.")
    rob = metrics.get("robustness", {})
    if rob.get("epsilons"):
        worst = min(rob.get("pgd") or [1.0])
        out.append(f"Not robust to adversarial noise: PGD at ε = {max(rob['epsilons']):g} leaves {fmt(worst)} accuracy.")
    out.append("Performance on other scanners, sites, protocols or populations is unknown.")
    return out


def decision_text(metrics: dict) -> str:
    """The decision rule a prediction applies (evaluate's ``decision``, chosen on validation)."""
    d = metrics.get("decision")
    if not d:
        return "No decision rule recorded (metrics.json from before prediction existed): predictions use argmax."
    if d.get("text"):  # a task with its own rule (per-finding thresholds, the referable cut) says it itself
        return str(d["text"])
    if d.get("rule") != "threshold" or d.get("threshold") is None:
        return ("Predictions on new data name the most probable class (argmax): "
                + ("more than two classes." if len(metrics.get("classes") or metrics.get("per_class") or []) > 2
                   else "no validation split with both classes to choose a threshold on."))
    which = "temperature-scaled probability" if d.get("calibrated") else "probability"
    return (f"Predictions on new data call {d['positive']} when its {which} is ≥ {d['threshold']:.3f}: the cut-off "
            f"with the largest sensitivity + specificity ({d.get('criterion', 'youden')}) on the validation split "
            f"(n = {d.get('val_n', '–')}), never on the test split. The test metrics above are argmax's.")


def tta_rows(metrics: dict) -> list[tuple]:
    """metric, without TTA, with TTA, difference (evaluate's ``tta``, when enabled)."""
    t = metrics.get("tta") or {}
    names = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "roc_auc": "ROC AUC",
             "pr_auc": "PR AUC", "qwk": "quadratic weighted kappa", "macro_roc_auc": "macro ROC AUC",
             "micro_roc_auc": "micro ROC AUC", "weighted_log_loss": "weighted log loss (lower is better)"}
    return [(name, fmt(t[k].get("without")), fmt(t[k].get("with")),
             f"{t[k]['delta']:+.3f}" if isinstance(t[k].get("delta"), float) else fmt(t[k].get("delta")))
            for k, name in names.items() if isinstance(t.get(k), dict)]


def tta_note(metrics: dict) -> str:
    t = metrics.get("tta")
    if not t:
        return "Test-time augmentation off (project setting `tta.enabled: false`)."
    return (f"Test-time augmentation: probabilities averaged over {len(t['views'])} views ({', '.join(t['views'])}"
            + (f"; shifts of {t['shift']} px" if t.get("shift") else "") + "). The headline metrics are without it.")


def prediction_rows(summaries: dict[str, dict]) -> list[tuple]:
    """Per predict source: files, predicted, not decoded, patients, predicted classes, mean
    calibrated probability per class, the model applied."""
    rows = []
    for name, s in summaries.items():
        model = s.get("model") or {}
        rows.append((name, s.get("files"), s.get("predicted"), s.get("not_decoded"), s.get("patients"),
                     ", ".join(f"{c}: {n}" for c, n in (s.get("per_class") or {}).items()) or "–",
                     ", ".join(f"{c}: {v:.3f}" for c, v in (s.get("mean_calibrated") or {}).items()) or "–",
                     f"{model.get('name') or '–'} {model.get('version') or ''}".strip()))
    return rows


PREDICTION_HEADER = ("source", "files", "predicted", "not decoded", "patients", "predicted class",
                     "mean calibrated probability", "model")


def prediction_note(summaries: dict[str, dict]) -> str:
    if not summaries:
        return "No predict source in this project (`predict.sources` in config.yaml)."
    return ("New, unlabeled data that passed the same gate as the training data (ingest, anonymize, audit), "
            "decoded with the training run's preprocessing; the predicted class uses the decision rule above. "
            "Counts only: per-file predictions are in results/<project>/predict/<source>/predictions.csv "
            "(pseudonymous), the re-identified copy in the PHI zone. No accuracy can be stated: the data "
            "carries no labels.")
