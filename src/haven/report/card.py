"""The model card: Markdown (``templates/model_card.md.j2``) from the same findings as the page,
written next to the model too and logged with it to the train run in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from haven.report import findings as f
from haven.report.artefacts import Artefacts
from haven.report.render import render


def hyperparameters(best: dict) -> dict:
    """The tuned configuration as the page and the card both show it."""
    return {"best_value": f.fmt(best.get("value")), "best_config": json.dumps(best.get("config", {}), default=str)}


def applied(a: Artefacts) -> dict:
    """How the model is applied, as the page and the card both show it: the decision rule, TTA's
    effect on the test metrics, and the predictions on each predict source."""
    m = a.metrics
    return {"decision_text": f.decision_text(m), "tta_rows": f.tta_rows(m), "tta_note": f.tta_note(m),
            "prediction_rows": f.prediction_rows(a.predict), "prediction_header": f.PREDICTION_HEADER,
            "prediction_note": f.prediction_note(a.predict)}


def model_card(project: str, s: dict, a: Artefacts) -> str:
    m = a.metrics
    cv_rows, cv_header, cv_note = f.cv_table(a.run)
    sg, rob, cal = m.get("subgroups", {}), m.get("robustness", {}), m.get("calibration", {})
    return render(
        "model_card.md.j2", project=project, stats=a.stats, audit=a.audit, best=a.best,
        # run.json names the backbone it trained; older ones did not, the settings still do
        backbone=a.run.get("backbone", s["model"]["backbone"]), weights=s["model"]["weights"],
        freeze_epochs=s["train"]["freeze_epochs"], best_epoch=a.run.get("best_epoch"),
        mlflow_run=a.run.get("mlflow_run_id", "not tracked"), n_quarantined=sum(n for _, n in a.quarantine),
        split_rows=f.split_rows(a.stats), metric_rows=f.metric_rows(m), per_class_rows=f.per_class_rows(m),
        task_tables=f.task_tables(m), cv_rows=cv_rows, cv_header=cv_header, cv_note=cv_note, task_text=f.task_text(s.get("task", "classification"), a.stats),
        ci_note=f.ci_note(m), calibration_rows=f.calibration_rows(cal), calibration_note=f.calibration_note(cal),
        subgroup_summary=f.subgroup_summary(sg), gap_rows=f.gap_rows(sg), explain_summary=f.explain_summary(
            m.get("explain", {})), robustness=rob, robustness_rows=f.robustness_rows(rob),
        robustness_note=f.robustness_note(rob) if rob else "", limitations=f.limitations(a.stats, m),
        **applied(a), **hyperparameters(a.best))


def log_card(s: dict, run: dict, card: Path) -> None:
    """The model card next to the model in MLflow too (the train run's ``model/`` artifacts)."""
    # settings made by hand (tests, notebooks) may name no experiment or results folder, or say
    # track: false; an untracked training run has no MLflow run to log to
    if not (run.get("mlflow_run_id") and s.get("experiment") and s.get("results")) or s.get("track") is False:
        return
    import mlflow

    from haven import track as trk

    trk.setup(s["experiment"], s["results"], s.get("tracking_uri"))
    with mlflow.start_run(run_id=run["mlflow_run_id"]):
        mlflow.log_artifact(str(card), artifact_path="model")
