"""Evaluate: the trained model on the held-out test split (patients never seen in training).

Five questions a model must answer before anyone ships it, each an output of the DAG and each
answered by one module of this package:

performance (:mod:`haven.trust.metrics`, through the project's Task)
    accuracy, balanced accuracy, per-class sensitivity/specificity, ROC AUC, PR AUC, confusion
    matrix; 95 % confidence intervals from a patient-level (cluster) bootstrap.
calibration (:mod:`haven.trust.calibration`)
    ECE, Brier score, NLL, a reliability diagram; optionally temperature scaling fitted on the
    validation split (it changes the probabilities, never the predicted class).
bias (:mod:`haven.trust.subgroups`)
    the same metrics per subgroup of every coarse attribute the data carries through
    anonymization (sex, age band, site), the largest gap between groups and a flag.
interpretability (:mod:`haven.trust.explain`)
    Grad-CAM and Integrated Gradients overlays for a seeded sample of correct and wrong test
    images per class, and the model-randomization sanity check.
adversarial robustness (:mod:`haven.trust.robustness`)
    accuracy under FGSM and PGD on a seeded, class-stratified subsample, at ``epsilons`` in
    *normalized* pixel units: the attack perturbs the network input ``(x/255 - mean) / std``
    directly and keeps it inside the image range ``[(0 - mean)/std, (1 - mean)/std]`` per
    channel. An epsilon of ``e`` is ``e * std`` of the [0, 1] intensity range
    (``epsilon_pixel`` in ``metrics.json``).

Those five answers are single-label classification's (:mod:`haven.trust.classify`); another
task brings its own evaluation (``Task.evaluate``), adapting each question to what it predicts.
The stage writes exactly the files it is handed in :class:`Outputs` (the rule names them, so the
list of files lives in one place): ``metrics.json``, the subgroup table, the predictions and the
attribution maps (``.npz``) and one figure per :data:`PLOT_KINDS` entry it is given a path for
(:mod:`haven.trust.plots`); everything is logged to the project's train run in MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

from haven.io import atomic_write_text
from haven.trust.context import PLOT_KINDS, Context, Laps, Outputs, jsonable

__all__ = ["PLOT_KINDS", "Outputs", "evaluate"]


def evaluate(model_path: str | Path, test_path: str | Path, val_path: str | Path | None, outputs: Outputs,
             settings: dict, task: str, tracking: dict | None = None, seed: int = 42, tta: dict | None = None,
             task_options: dict | None = None) -> dict:
    """The evaluate stage: see the module docstring. ``settings`` is the project's validated
    ``evaluate`` config section (``haven.config.section_defaults("evaluate")`` outside a project),
    ``task`` its ``task:`` name and ``task_options`` that task's section; ``val_path`` (may be None
    or missing) is only read for temperature scaling and the decision rule. ``tta``: the project's
    ``tta`` section; when enabled, ``metrics["tta"]`` holds the test metrics with and without it
    (the headline metrics stay the plain model's). Returns what it writes to ``outputs.metrics``."""
    import torch

    from haven.learn.checkpoint import load_model
    from haven.learn.data import ZarrSplit
    from haven.learn.tasks import get_task

    lap = Laps()
    torch.set_num_threads(int(settings["threads"]))
    for path in outputs.files():
        path.parent.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_path)
    model.requires_grad_(False)  # attributions and attacks need input gradients only
    test = ZarrSplit(Path(test_path))
    if len(test) == 0:
        raise ValueError(f"{test_path} holds no image: nothing to evaluate (check the preprocess split)")
    val = ZarrSplit(Path(val_path)) if val_path is not None and Path(val_path).exists() else None
    learning_task = get_task(task, task_options if task_options is not None else meta.get("task_options"))
    ctx = Context(model=model, meta=meta, task=learning_task, test=test, val=val if val is not None and len(val) else None,
                  outputs=outputs, settings=settings, seed=seed, tta=tta, lap=lap)
    for path in outputs.plots.values():
        path.unlink(missing_ok=True)  # what the task leaves undrawn is found below, not taken from a last run
    metrics = learning_task.evaluate(ctx)
    _note_undrawn(outputs, learning_task.name)
    metrics["settings"] = _settings_record(settings)
    metrics["seconds"] = lap.seconds
    metrics = jsonable(metrics)
    if tracking and tracking.get("train_run_id"):
        _log(tracking, metrics, outputs, learning_task.flat_metrics(metrics))
    atomic_write_text(outputs.metrics, json.dumps(metrics, indent=2))
    return metrics


def _note_undrawn(outputs: Outputs, task: str) -> None:
    """A panel saying so for every declared figure the task does not draw (a classifier has no
    predicted masks to overlay): the report shows the reason where the figure would be."""
    from haven.trust.segplots import plot_note

    for kind, path in outputs.plots.items():
        if not path.is_file():
            plot_note(path, f"no {kind.replace('_', ' ')} figure",
                      f"the {task} task does not draw this figure (it applies to another task)")


def _settings_record(s: dict) -> dict:
    """The settings as recorded in metrics.json, in the schema's key order: the rules pass them as
    sorted JSON, and metrics.json should not depend on how they arrived."""
    from haven.config import section_defaults

    return {k: s[k] for k in section_defaults("evaluate")}


def flat_metrics(metrics: dict, task: str = "classification", task_options: dict | None = None) -> dict[str, float]:
    """The scalars of a metrics.json logged to MLflow (``test_*``), as its task flattens them."""
    from haven.learn.tasks import get_task

    return get_task(task, task_options).flat_metrics(metrics)


def _log(tracking: dict, metrics: dict, outputs: Outputs, flat: dict[str, float]) -> None:
    import mlflow

    from haven import track as trk

    trk.setup(tracking["experiment"], tracking["results"], tracking.get("uri"))
    with mlflow.start_run(run_id=tracking["train_run_id"]):
        mlflow.log_metrics(flat)
        for path in [*outputs.plots.values(), outputs.subgroups_table]:
            if path is not None and path.is_file():
                mlflow.log_artifact(str(path), artifact_path="evaluate")
        mlflow.log_dict(metrics, "evaluate/metrics.json")
