"""haven evaluate: test metrics, calibration, subgroups, explanations, robustness."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from haven.cli.common import settings, tracking, stage_args, lineage

log = logging.getLogger("haven")


def cmd_evaluate(args) -> int:
    from haven.trust.evaluate import evaluate

    s = settings(args)
    lineage(args, s)
    run = json.loads(Path(args.run).read_text()).get("mlflow_run_id") if args.run else None
    metrics = evaluate(Path(args.model), Path(args.preprocessed), Path(args.out), tracking=tracking(s, train_run_id=run),
                       settings=s.get("evaluate"), seed=s["seed"])
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "roc_auc")}))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="test-split metrics and plots, logged to MLflow")
    p.add_argument("model")
    p.add_argument("preprocessed")
    p.add_argument("out")
    p.add_argument("--run", help="the train stage's run.json (MLflow run to log into)")
    stage_args(p)
    p.set_defaults(func=cmd_evaluate)

