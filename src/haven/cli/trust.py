"""haven evaluate: test metrics, calibration, subgroups, explanations, robustness."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from haven.cli.common import settings, tracking, stage_args, lineage

log = logging.getLogger("haven")


def _plot(value: str) -> tuple[str, Path]:
    """``KIND=PATH`` of --plot (the kind is checked by the stage, which knows what it draws)."""
    kind, sep, path = value.partition("=")
    if not sep or not kind or not path:
        raise argparse.ArgumentTypeError(f"expected KIND=PATH, got {value!r}")
    return kind, Path(path)


def cmd_evaluate(args) -> int:
    from haven.trust.evaluate import Outputs, evaluate

    s = settings(args)
    lineage(args, s)
    kinds = [k for k, _ in args.plot]
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:  # dict() below would silently keep the last path
        raise ValueError(f"--plot names a figure twice: {', '.join(twice)}")
    outputs = Outputs(metrics=args.metrics, subgroups_table=args.subgroups_table, predictions=args.predictions,
                      explain_maps=args.explain_maps, plots=dict(args.plot))
    run = json.loads(Path(args.run).read_text()).get("mlflow_run_id") if args.run else None
    metrics = evaluate(args.model, args.test, args.val, outputs, settings=s["evaluate"], task=s["task"],
                       tracking=tracking(s, train_run_id=run), seed=s["seed"], tta=s.get("tta"),
                       task_options=s.get("task_options"))
    # the headline figures each task has (classification's; multilabel's macro AUC; ordinal's kappa)
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "roc_auc", "macro_roc_auc", "qwk")
                      if k in metrics}))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="test-split metrics and plots, logged to MLflow")
    # every file read and written is named here (the rule passes them all): the stage builds no path
    p.add_argument("--model", required=True, type=Path, help="the train stage's model.pt")
    p.add_argument("--test", required=True, type=Path, help="the preprocessed test split (test.zarr)")
    p.add_argument("--val", type=Path, help="the preprocessed validation split (val.zarr), for temperature scaling")
    p.add_argument("--run", help="the train stage's run.json (MLflow run to log into)")
    p.add_argument("--metrics", required=True, type=Path, help="metrics.json to write")
    p.add_argument("--subgroups-table", type=Path, help="CSV of every subgroup metric to write")
    p.add_argument("--predictions", type=Path, help=".npz of the test probabilities and labels to write")
    p.add_argument("--explain-maps", type=Path, help=".npz of the Grad-CAM / IG maps to write")
    p.add_argument("--plot", type=_plot, action="append", default=[], metavar="KIND=PATH",
                   help="a figure to draw (repeatable): confusion, roc, pr, reliability, subgroups, gradcam, "
                        "integrated_gradients, robustness")
    stage_args(p)
    p.set_defaults(func=cmd_evaluate)
