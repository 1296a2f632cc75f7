"""Report: one self-contained HTML page and a Markdown model card per project.

The page (``report/index.html``, images embedded as data URIs so it travels alone and shows
inside ``snakemake --report``) has: data summary (images/patients per split and class,
quarantined files by reason, the de-identification audit), the hyperparameter search, the
training curves, every evaluate output (metrics with confidence intervals, confusion, ROC, PR,
calibration, subgroup audit, Grad-CAM / Integrated Gradients with the randomization check,
adversarial robustness) and the model card. The model card is also written as Markdown next to
the model (``train/model_card.md``) and logged with it to the train run in MLflow.

Only pseudonymous artefacts are read (counts, reasons, metrics, plots): original paths from
the quarantine lists never reach the report, since folder names often carry identifiers.

:func:`browser_check` opens a page in headless Chromium and reports images that did not load
and links that lead nowhere.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from haven.io import atomic_write_text

EVALUATE_PLOTS = (
    ("confusion.png", "Confusion matrix"),
    ("roc.png", "ROC curves (one-vs-rest)"),
    ("pr.png", "Precision-recall curves"),
    ("reliability.png", "Reliability diagram"),
    ("subgroups.png", "Subgroup audit"),
    ("gradcam.png", "Grad-CAM overlays"),
    ("integrated_gradients.png", "Integrated Gradients overlays"),
    ("robustness.png", "Robustness curve"),
)


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: not available</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(rows: list[tuple], header: tuple) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))


def _ci(v, ci) -> str:
    """``0.958 [0.936, 0.979]``, or just the value when there is no interval."""
    if v is None:
        return "–"
    return f"{_fmt(v)} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else _fmt(v)


def plot_history(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(history["epoch"], history["train_loss"], marker="o", label="train loss")
    if "val_loss" in history:
        a.plot(history["epoch"], history["val_loss"], marker="o", label="val loss")
    a.set_xlabel("epoch")
    a.legend()
    for col in ("val_accuracy", "val_balanced_accuracy"):
        if col in history:
            b.plot(history["epoch"], history[col], marker="o", label=col)
    if "frozen" in history and history["frozen"].any():
        last = history.loc[history["frozen"] == 1, "epoch"].max()
        for ax in (a, b):
            ax.axvspan(-0.5, last + 0.5, color="grey", alpha=0.15, label="frozen backbone")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1.02)
    b.legend()
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _quarantine_reasons(path: Path) -> list[tuple]:
    if not path.is_file():
        return []
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if df.empty:
        return []
    return [(reason, n) for reason, n in df["reason"].value_counts().items()]


# ---------------------------------------------------------------------------------------------
# the findings, as rows shared by the page and the card
def metric_rows(metrics: dict) -> list[tuple]:
    ci = metrics.get("ci") or {}
    rows = [("n (test images)", metrics["n"])]
    for key, name in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC AUC"),
                      ("pr_auc", "PR AUC (average precision)")):
        rows.append((name, _ci(metrics.get(key), ci.get(key))))
    rows.append(("chance (majority class)", _fmt(metrics.get("chance_accuracy"))))
    return rows


def per_class_rows(metrics: dict) -> list[tuple]:
    ci = (metrics.get("ci") or {}).get("per_class", {})
    return [(c, _ci(v["sensitivity"], ci.get(c, {}).get("sensitivity")),
             _ci(v["specificity"], ci.get(c, {}).get("specificity"))) for c, v in metrics["per_class"].items()]


def ci_note(metrics: dict) -> str:
    ci = metrics.get("ci")
    if not ci:
        return "No confidence intervals (evaluate.bootstrap = 0)."
    return (f"[low, high]: {round(100 * ci['level'])} % percentile bootstrap intervals over {ci['resamples']} "
            f"resamples of {'patients (all slices of a patient together)' if ci['unit'] == 'patient' else 'images'}.")


def calibration_rows(cal: dict) -> list[tuple]:
    rows = [("expected calibration error (ECE)", _fmt(cal.get("ece")), _fmt(cal.get("ece_scaled"))),
            ("Brier score", _fmt(cal.get("brier")), _fmt(cal.get("brier_scaled"))),
            ("negative log-likelihood", _fmt(cal.get("nll")), _fmt(cal.get("nll_scaled")))]
    return rows


def calibration_note(cal: dict) -> str:
    if cal.get("temperature") is None:
        return f"ECE over {cal.get('bins')} equal-width confidence bins; no temperature scaling."
    return (f"ECE over {cal['bins']} equal-width confidence bins. Temperature scaling fitted on the validation split "
            f"(n = {cal.get('val_n')}): T = {cal['temperature']:.2f} ({'over' if cal['temperature'] > 1 else 'under'}"
            f"confident model); it rescales the probabilities and never changes a prediction.")


def subgroup_rows(sg: dict) -> list[tuple]:
    """attribute, group, n, the gap metrics, in the gap?"""
    rows = []
    for attr, e in sg.get("attributes", {}).items():
        for g, v in e["groups"].items():
            rows.append((attr, g, v.get("n"), *[_fmt(v.get(m)) for m in sg["gap_metrics"]], _fmt(v.get("roc_auc")),
                         "yes" if g in e["eligible_groups"] else "no (small or unknown)"))
    return rows


def _metric_label(sg: dict, m: str) -> str:
    """``sensitivity (hemorrhage)`` for binary projects: whose sensitivity it is."""
    return f"{m} ({sg['positive_class']})" if m in ("sensitivity", "specificity") and sg.get("positive_class") else m


def gap_rows(sg: dict) -> list[tuple]:
    rows = []
    for attr, e in sg.get("attributes", {}).items():
        for m, gp in e["gaps"].items():
            rows.append((attr, _metric_label(sg, m), f"{gp['gap']:.3f}", f"{gp['best']} ({gp['best_value']:.3f})",
                         f"{gp['worst']} ({gp['worst_value']:.3f})",
                         "FLAGGED" if gp["gap"] > sg["threshold"] else "ok"))
    return rows


def subgroup_summary(sg: dict) -> str:
    parts = []
    lg = sg.get("largest_gap")
    if lg:
        parts.append(f"Largest gap: {lg['gap']:.3f} in {_metric_label(sg, lg['metric'])} across {lg['attribute']} "
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
                     _ci(rob["fgsm"][i], fci), _ci(rob["pgd"][i], pci)))
    return rows


def robustness_note(rob: dict) -> str:
    return (f"Untargeted L-inf attacks (adversarial-robustness-toolbox) on {rob.get('n')} class-stratified test images "
            f"(clean accuracy {_fmt(rob.get('clean_accuracy'))}); PGD {rob.get('pgd_steps')} steps. Epsilon in "
            "normalized pixel units (the network input), also as 8-bit grey levels (ε × std × 255); "
            "95 % Wilson intervals.")


def limitations(stats: dict, metrics: dict) -> list[str]:
    """Limitations stated from the findings, not boilerplate only."""
    out = []
    ci = (metrics.get("ci") or {}).get("balanced_accuracy")
    if ci:
        out.append(f"Test set of {metrics['n']} images / {stats['patients']['test']} patients: balanced accuracy is "
                   f"known only to within [{ci[0]:.3f}, {ci[1]:.3f}].")
    cal = metrics.get("calibration", {})
    if cal.get("ece") is not None and cal["ece"] > 0.05:
        after = f"; {cal['ece_scaled']:.3f} after temperature scaling" if cal.get("ece_scaled") is not None else ""
        out.append(f"Probabilities are miscalibrated (ECE {cal['ece']:.3f}{after}); do not read them as risks.")
    sg = metrics.get("subgroups", {})
    for attr in sg.get("flagged_attributes", []):
        lg = sg["attributes"][attr]["largest_gap"]
        out.append(f"Performance differs across {attr}: {_metric_label(sg, lg['metric'])} gap {lg['gap']:.3f} "
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
        out.append(f"Not robust to adversarial noise: PGD at ε = {max(rob['epsilons']):g} leaves {_fmt(worst)} accuracy.")
    out.append("Performance on other scanners, sites, protocols or populations is unknown.")
    return out


def _pixel_text(audit: dict) -> str:
    """The audit's OCR of burned-in text, when it read any pixels."""
    read, not_read = audit.get("pixel_text_read", 0), audit.get("pixel_text_not_read", 0)
    if not read and not not_read:
        return ""
    return f"; burned-in text read by OCR in {read} file(s)" + (f", {not_read} not readable" if not_read else "")


def model_card(project: str, s: dict, stats: dict, metrics: dict, best: dict, run: dict,
               quarantined: int = 0, audit: dict | None = None) -> str:
    classes = ", ".join(stats["classes"])
    audit = audit or {}
    split_rows = [(n, stats["samples"][n], stats["patients"][n],
                   ", ".join(f"{k}: {v}" for k, v in stats["per_class"][n].items())) for n in stats["samples"]]
    sg = metrics.get("subgroups", {})
    gaps = gap_rows(sg)
    rob = metrics.get("robustness", {})
    cal = metrics.get("calibration", {})
    return f"""# Model card: {project}

## Model
- Backbone: `{run.get('backbone', s['model']['backbone'])}` initialised from `{s['model']['weights']}`, new classification head
- Training: frozen backbone for {s['train']['freeze_epochs']} epoch(s), then fine-tuning; best epoch {run.get('best_epoch')}
- Hyperparameters (tuned, {best.get('trials')} trials, {best.get('metric')} = {_fmt(best.get('value'))}): `{json.dumps(best.get('config', {}), default=str)}`
- MLflow run: `{run.get('mlflow_run_id', 'not tracked')}`

## Intended use
Research only: a {len(stats['classes'])}-class image classifier ({classes}) built by the haven pipeline.
Not a medical device; not validated for clinical decisions. Out of scope: any decision about an
individual patient, populations or devices unlike the training data.

## Data
De-identified data that passed the haven audit ({'passed' if audit.get('passed') else 'NOT passed'}, {audit.get('files', '–')} files re-read);
{quarantined} file(s) quarantined. Patient-level split (no patient in two splits); input {stats['size']}×{stats['size']}, {stats['channels']} channel(s).

{_md_table(split_rows, ('split', 'images', 'patients', 'per class'))}

## Metrics (held-out test split)
{_md_table(metric_rows(metrics), ('metric', 'value [95 % CI]'))}

{_md_table(per_class_rows(metrics), ('class', 'sensitivity', 'specificity'))}

{ci_note(metrics)}

## Calibration
{_md_table(calibration_rows(cal), ('measure', 'as trained', 'temperature scaled'))}

{calibration_note(cal)}

## Subgroup gaps
{subgroup_summary(sg)}

{_md_table(gaps, ('attribute', 'metric', 'gap', 'best group', 'worst group', 'flag')) if gaps else ''}

## Interpretability
{explain_summary(metrics.get('explain', {}))}

## Adversarial robustness
{_md_table(robustness_rows(rob), ('epsilon (normalized)', 'grey levels', 'FGSM accuracy', 'PGD accuracy')) if rob else 'not evaluated'}

{robustness_note(rob) if rob else ''}

## Limitations
""" + "\n".join(f"- {x}" for x in limitations(stats, metrics)) + "\n"


# ---------------------------------------------------------------------------------------------
SECTIONS = (("data", "Data"), ("search", "Hyperparameter search"), ("training", "Training"),
            ("metrics", "Test metrics"), ("calibration", "Calibration"), ("bias", "Subgroup audit"),
            ("interpretability", "Interpretability"), ("robustness", "Adversarial robustness"),
            ("card", "Model card"))


def project_report(results: Path, out_dir: Path, s: dict) -> Path:
    project = s.get("project", results.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = results / "evaluate"
    stats = json.loads((results / "preprocess" / "stats.json").read_text())
    metrics = json.loads((ev / "metrics.json").read_text())
    audit = json.loads((results / "anonymize" / "audit.json").read_text())
    best = yaml.safe_load((results / "tune" / "best_config.yaml").read_text())
    run = json.loads((results / "train" / "run.json").read_text())
    history = pd.read_csv(results / "train" / "history.csv")
    curves = out_dir / "training_curves.png"
    plot_history(history, curves)

    quarantine = _quarantine_reasons(results / "ingest" / "quarantine.csv") + \
        _quarantine_reasons(results / "anonymize" / "quarantine.csv")
    n_quarantined = sum(n for _, n in quarantine)
    card = model_card(project, s, stats, metrics, best, run, n_quarantined, audit)
    atomic_write_text(out_dir / "model_card.md", card)
    atomic_write_text(results / "train" / "model_card.md", card)  # next to model.pt
    _log_card(s, run, results / "train" / "model_card.md")

    split_rows = [(name, stats["samples"][name], stats["patients"][name],
                   ", ".join(f"{k}: {v}" for k, v in stats["per_class"][name].items())) for name in stats["samples"]]
    sg = metrics.get("subgroups", {})
    rob = metrics.get("robustness", {})
    cal = metrics.get("calibration", {})
    trials = _trials_table(results / "tune" / "trials.csv")
    flag = sg.get("flagged")
    plots = dict(EVALUATE_PLOTS)
    toc = " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in SECTIONS)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>haven · {html.escape(project)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}
img{{max-width:100%}}figure{{display:inline-block;margin:.5em;vertical-align:top}}.ok{{color:#060}}.bad{{color:#a00}}
nav{{margin-bottom:1em}}pre{{white-space:pre-wrap;background:#f7f7f7;padding:1em}}</style></head>
<body><h1>haven · {html.escape(project)}</h1>
<nav>{toc}</nav>
<h2 id="data">Data</h2>
{_table(split_rows, ("split", "images", "patients", "per class"))}
<p>Quarantined files: {n_quarantined}</p>
{_table(quarantine, ("reason", "files")) if quarantine else ""}
<p>De-identification audit: <strong class="{'ok' if audit.get('passed') else 'bad'}">{'passed' if audit.get('passed') else 'FAILED'}</strong>
({audit.get('files')} files re-read, {len(audit.get('findings', []))} findings{_pixel_text(audit)})</p>
<h2 id="search">Hyperparameter search</h2>
<p>{best.get('trials')} trials, best {html.escape(str(best.get('metric')))} = {_fmt(best.get('value'))} with
<code>{html.escape(json.dumps(best.get('config', {}), default=str))}</code></p>
{trials}
{_img(results / 'tune' / 'search.png', 'search: validation metric per trial and epoch')}
<h2 id="training">Training</h2>
{_img(curves, 'training curves')}
<h2 id="metrics">Test metrics (held-out test split)</h2>
{_table(metric_rows(metrics), ("metric", "value [95 % CI]"))}
{_table(per_class_rows(metrics), ("class", "sensitivity", "specificity"))}
<p>{html.escape(ci_note(metrics))}</p>
{_img(ev / 'confusion.png', plots['confusion.png'])}
{_img(ev / 'roc.png', plots['roc.png'])}
{_img(ev / 'pr.png', plots['pr.png'])}
<h2 id="calibration">Calibration</h2>
{_table(calibration_rows(cal), ("measure", "as trained", "temperature scaled"))}
<p>{html.escape(calibration_note(cal))}</p>
{_img(ev / 'reliability.png', plots['reliability.png'])}
<h2 id="bias">Subgroup audit</h2>
<p class="{'bad' if flag else 'ok'}">{html.escape(subgroup_summary(sg))}</p>
{_table(gap_rows(sg), ("attribute", "metric", "gap", "best group", "worst group", "flag")) if gap_rows(sg) else ""}
{_table(subgroup_rows(sg), ("attribute", "group", "n", *[_metric_label(sg, m) for m in sg.get("gap_metrics", [])], "ROC AUC", "in the gap")) if subgroup_rows(sg) else ""}
{_img(ev / 'subgroups.png', plots['subgroups.png'])}
<h2 id="interpretability">Interpretability</h2>
<p>{html.escape(explain_summary(metrics.get('explain', {})))}</p>
{_img(ev / 'gradcam.png', plots['gradcam.png'])}
{_img(ev / 'integrated_gradients.png', plots['integrated_gradients.png'])}
<h2 id="robustness">Adversarial robustness</h2>
{_table(robustness_rows(rob), ("epsilon (normalized)", "grey levels", "FGSM accuracy", "PGD accuracy")) if rob else ""}
<p>{html.escape(robustness_note(rob)) if rob else ""}</p>
{_img(ev / 'robustness.png', plots['robustness.png'])}
<h2 id="card">Model card</h2>
<p>Also at <code>train/model_card.md</code>, next to the model.</p>
<pre>{html.escape(card)}</pre>
</body></html>
"""
    return atomic_write_text(out_dir / "index.html", page)


def _trials_table(path: Path, top: int = 8) -> str:
    if not path.is_file():
        return ""
    df = pd.read_csv(path)
    if df.empty:
        return ""
    metric = next((c for c in ("val_balanced_accuracy", "val_accuracy") if c in df), None)
    if metric:
        df = df.sort_values(metric, ascending=False)
    cols = [c for c in df.columns if c.startswith("param_")] + [c for c in (metric, "training_iteration") if c]
    rows = [tuple(_fmt(v) if isinstance(v, float) else v for v in r) for r in df[cols].head(top).itertuples(index=False)]
    return _table(rows, tuple(c.removeprefix("param_") for c in cols))


def _log_card(s: dict, run: dict, card: Path) -> None:
    """The model card next to the model in MLflow too (the train run's ``model/`` artifacts)."""
    if not (run.get("mlflow_run_id") and s.get("experiment") and s.get("results")) or s.get("track") is False:
        return
    import mlflow

    from haven import track as trk

    trk.setup(s["experiment"], s["results"], s.get("tracking_uri"))
    with mlflow.start_run(run_id=run["mlflow_run_id"]):
        mlflow.log_artifact(str(card), artifact_path="model")


# ---------------------------------------------------------------------------------------------
# a real browser
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")

_PROBE = """<script>
(function () {
  function load(src) {  // resolves true when the browser decodes the image
    return new Promise(function (resolve) {
      var im = new Image();
      im.onload = function () { resolve(im.naturalWidth > 0 && im.naturalHeight > 0); };
      im.onerror = function () { resolve(false); };
      im.src = src;
    });
  }
  function decode(uri) {  // the text of a base64 data URI, as UTF-8
    var b = atob(uri.slice(uri.indexOf(',') + 1));
    var bytes = new Uint8Array(b.length);
    for (var i = 0; i < b.length; i++) bytes[i] = b.charCodeAt(i);
    return new TextDecoder('utf-8').decode(bytes);
  }
  window.addEventListener('load', function () {
    setTimeout(function () {
      var imgs = Array.prototype.slice.call(document.images);
      var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); });
      var links = Array.prototype.slice.call(document.querySelectorAll('a[href]')).map(function (a) {
        return a.getAttribute('href'); });
      var badAnchors = links.filter(function (h) {
        return h.charAt(0) === '#' && h.length > 1 && !document.getElementById(decodeURIComponent(h.slice(1))); });
      var out = {images: imgs.length, loaded: imgs.length - broken.length,
        broken: broken.map(function (i) { return i.alt || i.src.slice(0, 60); }),
        sizes: imgs.map(function (i) { return [i.naturalWidth, i.naturalHeight]; }),
        links: links, broken_anchors: badAnchors, title: document.title,
        text: (document.body.innerText || '').slice(0, 4000)};
      var jobs = [];
      // a Snakemake report (`var results = {...}`): every embedded result, and the images inside
      // embedded HTML pages
      var res = window.results;
      if (res && typeof res === 'object') {
        out.report_results = 0; out.report_images = 0; out.report_pages = 0; out.report_broken = [];
        Object.keys(res).forEach(function (key) {
          var uri = res[key] && res[key].data_uri;
          if (!uri) return;
          out.report_results += 1;
          if (uri.indexOf('data:image/') === 0) {
            out.report_images += 1;
            jobs.push(load(uri).then(function (ok) { if (!ok) out.report_broken.push(key); }));
          } else if (uri.indexOf('data:text/html') === 0) {
            out.report_pages += 1;
            var doc = new DOMParser().parseFromString(decode(uri), 'text/html');
            Array.prototype.forEach.call(doc.images, function (im) {
              out.report_images += 1;
              jobs.push(load(im.getAttribute('src')).then(function (ok) {
                if (!ok) out.report_broken.push(key + ' > ' + (im.alt || 'img')); }));
            });
          }
        });
      }
      Promise.all(jobs).then(function () {
        if (out.report_images !== undefined) out.report_loaded = out.report_images - out.report_broken.length;
        var pre = document.createElement('pre');
        pre.id = 'haven-browser-check';
        pre.textContent = JSON.stringify(out);
        document.body.appendChild(pre);
      });
    }, %(delay)d);
  });
})();
</script>"""


def find_chromium() -> str | None:
    for name in (os.environ.get("HAVEN_CHROMIUM"), *CHROMIUM_NAMES):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def browser_check(page: str | Path, chromium: str | None = None, timeout: float = 120, delay_ms: int = 1000) -> dict:
    """Open ``page`` in headless Chromium and report what a reader would see broken.

    A copy of the page with a probe script appended is loaded from a temporary folder next to the
    original (so relative links resolve the same). After the load event the probe lists every
    ``<img>`` that did not decode (``naturalWidth == 0``) and every ``#anchor`` link without a
    target; relative file links are checked on disk. Returns ``{"images", "loaded", "broken",
    "sizes", "links", "broken_anchors", "broken_files", "external_links", "title", "text"}``.
    On a ``snakemake --report`` page (a script app that renders results on demand) the probe also
    decodes every embedded result: ``report_results``, ``report_pages`` (embedded HTML pages),
    ``report_images`` (images, including those inside the pages), ``report_loaded`` and
    ``report_broken``. Raises ``FileNotFoundError`` when no Chromium is installed
    (``apt-get install -y chromium``).
    """
    page = Path(page).resolve()
    exe = chromium or find_chromium()
    if not exe:
        raise FileNotFoundError("no chromium found (apt-get install -y chromium, or set HAVEN_CHROMIUM)")
    # after </html> on purpose: a "</body>" may sit inside a script's string literal
    text = page.read_text(encoding="utf-8", errors="replace") + _PROBE % {"delay": delay_ms}
    with tempfile.TemporaryDirectory(prefix=".haven-check-", dir=page.parent) as tmp, \
            tempfile.TemporaryDirectory(prefix="haven-chromium-") as profile:
        copy = Path(tmp) / page.name
        copy.write_text(text, encoding="utf-8")
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-extensions", "--no-first-run", "--mute-audio",
               f"--user-data-dir={profile}", f"--virtual-time-budget={max(10000, 4 * delay_ms)}",
               "--run-all-compositor-stages-before-draw", "--dump-dom", copy.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="haven-browser-check">(.*?)</pre>', proc.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium did not run the page check (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(html.unescape(m.group(1)))
    files = [h for h in result["links"] if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", h, re.I)]
    result["broken_files"] = [h for h in files if not (page.parent / h.split("#")[0].split("?")[0]).exists()]
    result["external_links"] = [h for h in result["links"] if re.match(r"^(https?:)?//", h, re.I)]
    return result
