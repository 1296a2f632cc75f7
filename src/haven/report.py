"""Report: one self-contained HTML page and a Markdown model card per project.

Only pseudonymous artefacts are read (counts, reasons, metrics, plots): original paths from
the quarantine lists never reach the report, since folder names often carry identifiers.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd
import yaml

from haven.io import atomic_write_text


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: not available</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))


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


def model_card(project: str, s: dict, stats: dict, metrics: dict, best: dict, run: dict) -> str:
    classes = ", ".join(stats["classes"])
    per_class = "\n".join(
        f"| {c} | {_fmt(v['sensitivity'])} | {_fmt(v['specificity'])} |" for c, v in metrics["per_class"].items())
    return f"""# Model card: {project}

## Model
- Backbone: `{run.get('backbone', s['model']['backbone'])}` initialised from `{s['model']['weights']}`, new classification head
- Training: frozen backbone for {s['train']['freeze_epochs']} epoch(s), then fine-tuning; best epoch {run.get('best_epoch')}
- Hyperparameters (tuned, {best.get('trials')} trials, {best.get('metric')} = {_fmt(best.get('value'))}): `{json.dumps(best.get('config', {}), default=str)}`
- MLflow run: `{run.get('mlflow_run_id', 'not tracked')}`

## Intended use
Research only: a {len(stats['classes'])}-class image classifier ({classes}) built by the haven pipeline.
Not a medical device; not validated for clinical decisions.

## Data
De-identified data that passed the haven audit. Patient-level split (no patient in two splits):
train {stats['samples']['train']} images / {stats['patients']['train']} patients,
val {stats['samples']['val']} / {stats['patients']['val']}, test {stats['samples']['test']} / {stats['patients']['test']}.
Input {stats['size']}×{stats['size']}, {stats['channels']} channel(s).

## Metrics (held-out test split, n = {metrics['n']})
| metric | value |
|---|---|
| accuracy | {_fmt(metrics['accuracy'])} |
| balanced accuracy | {_fmt(metrics['balanced_accuracy'])} |
| ROC AUC | {_fmt(metrics.get('roc_auc'))} |
| chance (majority class) | {_fmt(metrics.get('chance_accuracy'))} |

| class | sensitivity | specificity |
|---|---|---|
{per_class}

## Limitations
- Small demo-scale test sets give wide uncertainty; no confidence intervals or calibration yet.
- Subgroup (sex, age band, site) performance not yet audited in this report.
- Performance on other scanners, sites or populations is unknown.
"""


def project_report(results: Path, out_dir: Path, s: dict) -> Path:
    project = s.get("project", results.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = json.loads((results / "preprocess" / "stats.json").read_text())
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    audit = json.loads((results / "anonymize" / "audit.json").read_text())
    best = yaml.safe_load((results / "tune" / "best_config.yaml").read_text())
    run = json.loads((results / "train" / "run.json").read_text())
    history = pd.read_csv(results / "train" / "history.csv")
    curves = out_dir / "training_curves.png"
    plot_history(history, curves)
    card = model_card(project, s, stats, metrics, best, run)
    atomic_write_text(out_dir / "model_card.md", card)

    quarantine = _quarantine_reasons(results / "ingest" / "quarantine.csv") + \
        _quarantine_reasons(results / "anonymize" / "quarantine.csv")
    split_rows = [(name, stats["samples"][name], stats["patients"][name],
                   ", ".join(f"{k}: {v}" for k, v in stats["per_class"][name].items())) for name in stats["samples"]]
    metric_rows = [(k, _fmt(metrics.get(k))) for k in ("n", "accuracy", "balanced_accuracy", "roc_auc", "chance_accuracy")]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>haven · {html.escape(project)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}
img{{max-width:100%}}figure{{display:inline-block;margin:.5em}}.ok{{color:#060}}.bad{{color:#a00}}</style></head>
<body><h1>haven · {html.escape(project)}</h1>
<h2>Data</h2>
{_table(split_rows, ("split", "images", "patients", "per class"))}
<p>Quarantined files: {sum(n for _, n in quarantine)}</p>
{_table(quarantine, ("reason", "files")) if quarantine else ""}
<p>De-identification audit: <strong class="{'ok' if audit.get('passed') else 'bad'}">{'passed' if audit.get('passed') else 'FAILED'}</strong>
({audit.get('files')} files re-read, {len(audit.get('findings', []))} findings)</p>
<h2>Hyperparameter search</h2>
<p>{best.get('trials')} trials, best {html.escape(str(best.get('metric')))} = {_fmt(best.get('value'))} with
<code>{html.escape(json.dumps(best.get('config', {}), default=str))}</code></p>
{_img(results / 'tune' / 'search.png', 'search: validation metric per trial and epoch')}
<h2>Training</h2>
{_img(curves, 'training curves')}
<h2>Evaluation (held-out test split)</h2>
{_table(metric_rows, ("metric", "value"))}
{_img(results / 'evaluate' / 'confusion.png', 'confusion matrix')}
{_img(results / 'evaluate' / 'roc.png', 'ROC curves')}
<h2>Model card</h2>
<pre>{html.escape(card)}</pre>
</body></html>
"""
    return atomic_write_text(out_dir / "index.html", page)
