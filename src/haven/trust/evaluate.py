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

The stage writes exactly the files it is handed in :class:`Outputs` (the rule names them, so the
list of files lives in one place): ``metrics.json``, the subgroup table, the predictions and the
attribution maps (``.npz``) and one figure per :data:`PLOT_KINDS` entry it is given a path for
(:mod:`haven.trust.plots`); everything is logged to the project's train run in MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from haven.io import atomic_write_text
from haven.trust import plots
from haven.trust.calibration import calibration
from haven.trust.explain import attribution_maps, gradcam_layer, randomization_test, select_examples
from haven.trust.metrics import bootstrap_ci, positive_index
from haven.trust.robustness import robustness, stratified_subsample
from haven.trust.subgroups import subgroup_audit

if TYPE_CHECKING:  # torch loads inside the stage, not when the CLI imports this module
    import torch

# The figures the stage can draw; where each goes is the caller's (the rule's) choice.
PLOT_KINDS = ("confusion", "roc", "pr", "reliability", "subgroups", "gradcam", "integrated_gradients",
              "robustness")


@dataclass
class Outputs:
    """Where the stage writes. Only ``metrics`` is required; a file left None is not written, a
    figure kind left out of ``plots`` is not drawn (neither changes a number in metrics.json)."""

    metrics: Path
    subgroups_table: Path | None = None
    predictions: Path | None = None
    explain_maps: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.plots) - set(PLOT_KINDS))
        if unknown:
            raise ValueError(f"unknown plot {', '.join(unknown)} (known: {', '.join(PLOT_KINDS)})")
        self.metrics = Path(self.metrics)
        for name in ("subgroups_table", "predictions", "explain_maps"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.plots = {k: Path(v) for k, v in self.plots.items()}

    def files(self) -> list[Path]:
        return [p for p in (self.metrics, self.subgroups_table, self.predictions, self.explain_maps,
                            *self.plots.values()) if p is not None]


class _Laps:
    """Seconds per phase, for ``metrics["seconds"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def __call__(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self._t0, 2)
        self._t0 = time.perf_counter()


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


def _column(split, name: str) -> np.ndarray:
    """A per-sample string column of a split ('' where the data carried no value)."""
    if name not in split.group:
        return np.full(len(split), "", dtype=object)
    return np.array([str(v) for v in split.group[name][:].tolist()], dtype=object)


def _read(split, idx: np.ndarray) -> np.ndarray:
    if len(idx) == 0:
        return np.zeros((0,) + tuple(split.images.shape[1:]), np.uint8)
    return np.stack([np.asarray(split.images[int(i)]) for i in idx])


def evaluate(model_path: str | Path, test_path: str | Path, val_path: str | Path | None, outputs: Outputs,
             settings: dict, task: str, tracking: dict | None = None, seed: int = 42, tta: dict | None = None) -> dict:
    """The evaluate stage: see the module docstring. ``settings`` is the project's validated
    ``evaluate`` config section (``haven.config.section_defaults("evaluate")`` outside a project),
    ``task`` its ``task:`` name; ``val_path`` (may be None or missing) is only read for
    temperature scaling and the decision rule. ``tta``: the project's ``tta`` section; when
    enabled, ``metrics["tta"]`` holds the test metrics with and without it (the headline metrics
    stay the plain model's). Returns what it writes to ``outputs.metrics``."""
    import torch

    from haven.learn.checkpoint import load_model
    from haven.learn.data import ZarrSplit
    from haven.learn.tasks import get_task

    s = settings
    learning_task = get_task(task)
    lap = _Laps()
    torch.set_num_threads(int(s["threads"]))
    for path in outputs.files():
        path.parent.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_path)
    model.requires_grad_(False)  # attributions and attacks need input gradients only
    classes = list(meta["classes"])
    pos = positive_index(classes, s["positive_label"])
    test = ZarrSplit(Path(test_path))
    if len(test) == 0:
        raise ValueError(f"{test_path} holds no image: nothing to evaluate (check the preprocess split)")
    probs, y = _predict(model, test, learning_task)
    pred = probs.argmax(1)
    metrics = _performance(learning_task, test, y, probs, classes, s, pos, seed)
    lap("metrics")
    if tta and tta.get("enabled"):
        metrics["tta"] = _tta(model, test, learning_task, tta, y, classes, s, metrics)
        lap("tta")

    val = None
    if s["temperature_scaling"] and val_path is not None and Path(val_path).exists():
        vsplit = ZarrSplit(Path(val_path))
        if len(vsplit):
            val = _predict(model, vsplit, learning_task)
    cal, scaled = calibration(probs, y, int(s["calibration_bins"]), val)
    metrics["calibration"] = cal
    metrics["decision"] = _decision(model, val_path, learning_task, val, classes, pos, cal.get("temperature"))
    lap("calibration")

    metrics["subgroups"] = _subgroups(test, y, probs, classes, s, pos, outputs.subgroups_table)
    lap("subgroups")

    ex = _attributions(model, test, y, pred, classes, s, seed, outputs.plots)
    lap("explain")
    metrics["explain"] = _randomization(model, ex, y, pred, classes, s, seed, outputs.explain_maps)
    lap("randomization")

    metrics["robustness"] = _robustness(model, test, y, s, seed, metrics["chance_accuracy"])
    lap("robustness")

    _figures(outputs.plots, metrics, y, probs, classes, pos, s, scaled, pixel=float(test.std.mean()))
    if outputs.predictions is not None:
        save = {"probs": probs, "labels": y}
        if scaled is not None:
            save["probs_temperature_scaled"] = scaled
        np.savez_compressed(outputs.predictions, **save)
    lap("plots")
    metrics["settings"] = _settings_record(s)
    metrics["seconds"] = lap.seconds
    metrics = _jsonable(metrics)
    if tracking and tracking.get("train_run_id"):
        _log(tracking, metrics, outputs)
    atomic_write_text(outputs.metrics, json.dumps(metrics, indent=2))
    return metrics


def _decision(model, val_path, task, val, classes: list[str], pos: int, temperature: float | None) -> dict:
    """The decision rule prediction applies (:mod:`haven.trust.decision`), chosen on the val split."""
    from haven.learn.data import ZarrSplit
    from haven.trust.decision import choose

    if val is None and val_path is not None and Path(val_path).exists():
        vsplit = ZarrSplit(Path(val_path))
        val = _predict(model, vsplit, task) if len(vsplit) else None
    return choose(*(val if val is not None else (None, None)), classes, pos, temperature)


def _predict(model, split, task) -> tuple[np.ndarray, np.ndarray]:
    from haven.learn.infer import predict

    # amp: predict's former default; autocast only acts on a GPU, and evaluate's model stays on the CPU
    return predict(model, split, task, amp="bf16")


# the test metrics compared with and without test-time augmentation
TTA_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc")


def _tta(model, test, task, spec: dict, y: np.ndarray, classes: list[str], s: dict, plain: dict) -> dict:
    """The test metrics of the TTA-averaged probabilities beside the plain ones (``with``,
    ``without``, ``delta`` per metric) and the views averaged."""
    import torch

    from haven.learn import tta
    from haven.learn.data import normalize

    out = []
    with torch.inference_mode():
        for x, _ in test.batches(128, shuffle=False):
            out.append(tta.scores(model, normalize(x, test.mean, test.std), task, spec).numpy())
    probs = np.concatenate(out)
    with_tta = task.metrics(y, probs, classes, s)
    record: dict = {"views": tta.views(spec), "shift": int(spec.get("shift") or 0)}
    for k in TTA_METRICS:
        a, b = plain.get(k), with_tta.get(k)
        record[k] = {"without": a, "with": b,
                     "delta": b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None}
    return record


def _settings_record(s: dict) -> dict:
    """The settings as recorded in metrics.json, in the schema's key order: the rules pass them as
    sorted JSON, and metrics.json should not depend on how they arrived."""
    from haven.config import section_defaults

    return {k: s[k] for k in section_defaults("evaluate")}


def _performance(task, test, y: np.ndarray, probs: np.ndarray, classes: list[str], s: dict, pos: int,
                 seed: int) -> dict:
    """The headline metrics (the Task's, so another task brings its own), chance and the CIs."""
    metrics = task.metrics(y, probs, classes, s)
    metrics["chance_accuracy"] = float(np.bincount(y, minlength=len(classes)).max() / max(len(y), 1))
    patients = _column(test, "patient")
    # resample patients when every image names one; otherwise images (an unknown patient
    # could be anyone's)
    clusters = patients if (patients != "").all() else None
    if s["bootstrap"] and len(y):
        metrics["ci"] = bootstrap_ci(y, probs, classes, int(s["bootstrap"]), float(s["ci_level"]), clusters,
                                     seed, pos)
    return metrics


def _subgroups(test, y: np.ndarray, probs: np.ndarray, classes: list[str], s: dict, pos: int,
               table_path: Path | None) -> dict:
    attrs = {a: _column(test, a) for a in s["subgroups"]}
    audit, table = subgroup_audit(y, probs, classes, attrs, int(s["min_group_size"]), float(s["gap_threshold"]),
                                  s["gap_metrics"], pos)
    if table_path is not None:
        table.to_csv(table_path, index=False)
    return audit


def _attributions(model, test, y: np.ndarray, pred: np.ndarray, classes: list[str], s: dict, seed: int,
                  plot_paths: dict[str, Path]) -> _Explained:
    """Grad-CAM and IG maps of the seeded example sample, and their overlays."""
    import torch

    from haven.learn.data import normalize

    mode = dict(test.group.attrs).get("mode")
    mean, std = test.mean, test.std
    black = normalize(torch.zeros((1, test.channels) + tuple(test.images.shape[-2:]), dtype=torch.uint8), mean, std)
    examples = select_examples(y, pred, int(s["explain_per_class"]), seed)
    idx = np.array([i for i, _ in examples], dtype=int)
    raw = _read(test, idx)
    xs = normalize(torch.from_numpy(raw), mean, std)
    layer = gradcam_layer(model, int(s["gradcam_stage"]))
    gc, ig, delta = attribution_maps(model, xs, pred[idx], layer, int(s["ig_steps"]), black)
    per_class = int(s["explain_per_class"])
    if "gradcam" in plot_paths:
        plots.plot_attributions(raw, gc, examples, y, pred, classes, "Grad-CAM", plot_paths["gradcam"], per_class,
                                mode, signed=True)
    if "integrated_gradients" in plot_paths:
        plots.plot_attributions(raw, ig, examples, y, pred, classes, "Integrated Gradients",
                                plot_paths["integrated_gradients"], per_class, mode)
    return _Explained(examples, idx, xs, black, layer, gc, ig, delta)


def _randomization(model, ex: _Explained, y: np.ndarray, pred: np.ndarray, classes: list[str], s: dict, seed: int,
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


def _robustness(model, test, y: np.ndarray, s: dict, seed: int, chance: float) -> dict:
    """FGSM/PGD on a seeded stratified subsample, in normalized units bounded by the image range."""
    import torch

    from haven.learn.data import normalize

    mean, std = test.mean, test.std
    att = stratified_subsample(y, int(s["attack_samples"]), seed)
    xa = normalize(torch.from_numpy(_read(test, att)), mean, std).numpy()
    lo = ((0 - mean) / std).view(-1, 1, 1).numpy()
    hi = ((1 - mean) / std).view(-1, 1, 1).numpy()
    rob = robustness(model, xa, y[att], list(s["epsilons"]), lo, hi, int(s["pgd_steps"]))
    rob["chance"] = chance
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


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The scalars logged to MLflow (prefixed ``test_``)."""
    out: dict[str, float] = {}

    def put(name, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and np.isfinite(v):
            out[f"test_{name}"] = float(v)

    for k in ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc"):
        put(k, metrics.get(k))
        ci = (metrics.get("ci") or {}).get(k)
        if ci:
            put(f"{k}_ci_low", ci[0])
            put(f"{k}_ci_high", ci[1])
    for c, v in metrics.get("per_class", {}).items():
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c)
        put(f"sensitivity_{safe}", v.get("sensitivity"))
        put(f"specificity_{safe}", v.get("specificity"))
    cal = metrics.get("calibration", {})
    for k in ("ece", "ece_scaled", "brier", "brier_scaled", "nll", "nll_scaled", "temperature"):
        put(k, cal.get(k))
    sg = metrics.get("subgroups", {})
    if sg.get("largest_gap"):
        put("subgroup_largest_gap", sg["largest_gap"]["gap"])
    put("subgroup_gap_flag", int(bool(sg.get("flagged"))))
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




def _log(tracking: dict, metrics: dict, outputs: Outputs) -> None:
    import mlflow

    from haven import track as trk

    trk.setup(tracking["experiment"], tracking["results"], tracking.get("uri"))
    with mlflow.start_run(run_id=tracking["train_run_id"]):
        mlflow.log_metrics(flat_metrics(metrics))
        for path in [*outputs.plots.values(), outputs.subgroups_table]:
            if path is not None and path.is_file():
                mlflow.log_artifact(str(path), artifact_path="evaluate")
        mlflow.log_dict(metrics, "evaluate/metrics.json")
