"""Report: the per-project page and model card, built from a real evaluate run on a tiny project,
and opened in a real browser (headless Chromium)."""

import base64
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from haven.report.artefacts import Inputs, Outputs
from haven.report.browser import browser_check, find_chromium
from haven.report.page import SECTIONS, project_report
from test_evaluate import tiny_evaluated

SECRET_FOLDER = "Doe_Jane_19650412"  # an identifier in a quarantined path: must never reach the report
# the evaluate plots by their names in rule evaluate's outputs (what rule report passes as
# --plot NAME=PATH), and the caption the page gives each
EVALUATE_PLOTS = (
    ("confusion", "Confusion matrix"),
    ("roc", "ROC curves (one-vs-rest)"),
    ("pr", "Precision-recall curves"),
    ("reliability", "Reliability diagram"),
    ("subgroups", "Subgroup audit"),
    ("gradcam", "Grad-CAM overlays"),
    ("integrated_gradients", "Integrated Gradients overlays"),
    ("robustness", "Robustness curve"),
    ("overlays", "Predicted and true masks"),
)

def _browser_required() -> bool:
    return os.environ.get("HAVEN_BROWSER_REQUIRED", "") not in ("", "0")


if find_chromium() is None and _browser_required():  # CI must open the report in a browser
    raise RuntimeError("HAVEN_BROWSER_REQUIRED is set but no Chromium is installed: run .ci/system-setup "
                       "(apt-get install -y chromium)")
needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="headless Chromium not installed: .ci/system-setup (apt-get install -y chromium)")


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [0.5, 0.7, 0.8])
    fig.savefig(path, dpi=60)
    plt.close(fig)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, _ = tiny_evaluated(tmp_path_factory)  # a real evaluate run on a tiny trained model
    (root / "ingest").mkdir()
    pd.DataFrame({"path": [f"{SECRET_FOLDER}/scan.txt", "broken.dcm"],
                  "reason": ["not DICOM or a supported image", "truncated"]}).to_csv(root / "ingest" / "quarantine.csv",
                                                                                   index=False)
    (root / "anonymize").mkdir()
    (root / "anonymize" / "audit.json").write_text(json.dumps({"files": 72, "findings": [], "passed": True}))
    pd.DataFrame({"input_index": [], "reason": []}).to_csv(root / "anonymize" / "quarantine.csv", index=False)
    stats = {"classes": ["left", "right"], "channels": 1, "size": 24, "mean": [0.3], "std": [0.3],
             "samples": {"train": 32, "val": 24, "test": 48}, "patients": {"train": 16, "val": 12, "test": 24},
             "per_class": {s: {"left": n // 2, "right": n // 2} for s, n in (("train", 32), ("val", 24), ("test", 48))}}
    (root / "preprocess" / "stats.json").write_text(json.dumps(stats))
    (root / "tune").mkdir()
    (root / "tune" / "best_config.yaml").write_text(yaml.safe_dump(
        {"config": {"lr": 0.003}, "metric": "val_balanced_accuracy", "mode": "max", "value": 0.9, "trials": 2}))
    pd.DataFrame({"val_balanced_accuracy": [0.9, 0.6], "training_iteration": [3, 1], "trial_id": ["a", "b"],
                  "param_lr": [0.003, 0.02]}).to_csv(root / "tune" / "trials.csv", index=False)
    _png(root / "tune" / "search.png")
    pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [0.7, 0.4, 0.2], "val_loss": [0.6, 0.4, 0.3],
                  "val_accuracy": [0.6, 0.8, 0.9], "val_balanced_accuracy": [0.6, 0.8, 0.9], "frozen": [1, 0, 0]}
                 ).to_csv(root / "train" / "history.csv", index=False)
    (root / "train" / "run.json").write_text(json.dumps({"best_epoch": 2, "backbone": "test_resnet"}))
    s = {"project": "tiny", "model": {"backbone": "test_resnet", "weights": None}, "train": {"freeze_epochs": 1},
         "tune": {}}
    inputs = Inputs(ingest_quarantine=root / "ingest" / "quarantine.csv",
                    anonymize_quarantine=root / "anonymize" / "quarantine.csv", audit=root / "anonymize" / "audit.json",
                    stats=root / "preprocess" / "stats.json", best=root / "tune" / "best_config.yaml",
                    trials=root / "tune" / "trials.csv", search=root / "tune" / "search.png",
                    history=root / "train" / "history.csv", run=root / "train" / "run.json",
                    metrics=root / "evaluate" / "metrics.json",
                    plots={name: root / "evaluate" / f"{name}.png" for name, _ in EVALUATE_PLOTS})
    outputs = Outputs(html=root / "report" / "index.html", card=root / "report" / "model_card.md",
                      card_with_model=root / "train" / "model_card.md", curves=root / "report" / "training_curves.png")
    page = project_report(inputs, outputs, s)
    return root, page


def test_page_has_every_section_and_plot(project):
    root, page = project
    text = page.read_text()
    metrics = json.loads((root / "evaluate" / "metrics.json").read_text())
    for anchor, title in SECTIONS:
        assert f'id="{anchor}"' in text and f'href="#{anchor}"' in text
    for _, alt in EVALUATE_PLOTS:
        assert f'alt="{alt}"' in text, alt
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == len(EVALUATE_PLOTS) + 2  # + search and training curves
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    lo, hi = metrics["ci"]["accuracy"]
    assert f"{metrics['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in text  # the CI is shown
    assert f"T = {metrics['calibration']['temperature']:.2f}" in text
    assert "FLAGGED (sex" in text and "age_band: not audited" in text  # the men's images show no square
    rho = metrics["explain"]["randomization_spearman"]["gradcam"]
    assert f"ρ = {rho:.2f}" in text
    for e, acc in zip(metrics["robustness"]["epsilons"], metrics["robustness"]["pgd"]):
        assert f"<td>{e:g}</td>" in text and f"{acc:.3f}" in text
    assert "not DICOM or a supported image" in text and SECRET_FOLDER not in text
    assert "not available" not in text


def test_model_card_is_written_next_to_the_model(project):
    root, _ = project
    card = (root / "train" / "model_card.md").read_text()
    assert card == (root / "report" / "model_card.md").read_text()
    for heading in ("## Intended use", "## Data", "## Metrics", "## Calibration", "## Subgroup gaps",
                    "## Interpretability", "## Adversarial robustness", "## Limitations"):
        assert heading in card, heading
    metrics = json.loads((root / "evaluate" / "metrics.json").read_text())
    assert f"| accuracy | {metrics['accuracy']:.3f} [" in card
    assert "Performance differs across" in card  # a flagged gap becomes a stated limitation
    assert "Not audited for bias across age_band" in card
    assert SECRET_FOLDER not in card


def test_plots_are_placed_by_name(project, tmp_path, caplog):
    """A plot not given reads "not available"; one given that the page has no place for is logged."""
    root, _ = project
    ev = root / "evaluate"
    plots = {name: ev / f"{name}.png" for name, _ in EVALUATE_PLOTS if name != "roc"} | {"extra": ev / "roc.png"}
    inputs = Inputs(ingest_quarantine=root / "ingest" / "quarantine.csv",
                    anonymize_quarantine=root / "anonymize" / "quarantine.csv", audit=root / "anonymize" / "audit.json",
                    stats=root / "preprocess" / "stats.json", best=root / "tune" / "best_config.yaml",
                    trials=root / "tune" / "trials.csv", search=root / "tune" / "search.png",
                    history=root / "train" / "history.csv", run=root / "train" / "run.json",
                    metrics=ev / "metrics.json", plots=plots)
    outputs = Outputs(html=tmp_path / "index.html", card=tmp_path / "model_card.md",
                      card_with_model=tmp_path / "train" / "model_card.md", curves=tmp_path / "training_curves.png")
    with caplog.at_level("WARNING", logger="haven"):
        text = project_report(inputs, outputs, {"project": "tiny", "model": {"backbone": "test_resnet", "weights": None},
                                                "train": {"freeze_epochs": 1}, "tune": {}}).read_text()
    assert "ROC curves (one-vs-rest): not available" in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == len(EVALUATE_PLOTS) - 1 + 2
    assert "'extra' has no place on the page" in caplog.text


@needs_chromium
def test_page_renders_in_chromium(project):
    _, page = project
    r = browser_check(page)
    assert r["title"] == "haven · tiny"  # the page decoded as UTF-8
    assert r["images"] == len(EVALUATE_PLOTS) + 2 and r["loaded"] == r["images"], r["broken"]
    assert all(w > 100 and h > 100 for w, h in r["sizes"])
    assert r["broken_anchors"] == [] and r["broken_files"] == [] and r["external_links"] == []
    assert len(r["links"]) == len(SECTIONS)


@needs_chromium
def test_browser_check_sees_broken_images_and_links(tmp_path):
    png = tmp_path / "real.png"
    _png(png)
    ok = base64.b64encode(png.read_bytes()).decode()
    page = tmp_path / "page.html"
    page.write_text(f"""<!doctype html><html><head><title>t</title></head><body>
<img alt="fine" src="data:image/png;base64,{ok}">
<img alt="corrupt" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUg">
<img alt="missing" src="nowhere.png">
<a href="#here">ok</a><a href="#nothere">bad</a><a href="real.png">file</a><a href="gone.html">gone</a>
<p id="here">x</p></body></html>""")
    r = browser_check(page)
    assert r["images"] == 3 and r["loaded"] == 1
    assert sorted(r["broken"]) == ["corrupt", "missing"]
    assert r["broken_anchors"] == ["#nothere"] and r["broken_files"] == ["gone.html"]


def test_browser_check_says_what_to_install(tmp_path, monkeypatch):
    page = tmp_path / "p.html"
    page.write_text("<html><body></body></html>")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("HAVEN_CHROMIUM", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install -y chromium"):
        browser_check(page)


@needs_chromium
def test_snakemake_report_embeds_plots_that_render(project, tmp_path):
    """`snakemake --report` of a workflow whose outputs are marked with report(): the browser
    decodes every embedded plot and every image inside the embedded summary page."""
    import subprocess
    import sys

    root, page = project
    (tmp_path / "caption.rst").write_text("A plot of {{ snakemake.wildcards.name }}.\n")
    (tmp_path / "Snakefile").write_text(f'''
rule all:
    input: expand("out/{{name}}.png", name=["robustness", "reliability"]), "out/index.html"

rule plot:
    input: "{root}/evaluate/{{name}}.png"
    output: report("out/{{name}}.png", caption="caption.rst", category="Evaluation")
    shell: "cp {{input}} {{output}}"

rule page:
    input: "{page}"
    output: report("out/index.html", caption="caption.rst", category="Summary")
    shell: "cp {{input}} {{output}}"
''')
    snake = [sys.executable, "-m", "snakemake", "--cores", "1", "--directory", str(tmp_path), "-s",
             str(tmp_path / "Snakefile")]
    run = subprocess.run(snake, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rep = subprocess.run(snake + ["--report", str(tmp_path / "report.html")], capture_output=True, text=True,
                         timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    r = browser_check(tmp_path / "report.html")
    assert r["report_results"] == 3 and r["report_pages"] == 1
    assert r["report_images"] == 2 + len(EVALUATE_PLOTS) + 2 and r["report_loaded"] == r["report_images"]
    assert "Evaluation" in r["text"]  # the report app rendered its navigation
