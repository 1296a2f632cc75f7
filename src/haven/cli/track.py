"""haven register and haven compare: the MLflow model registry."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from haven.cli.common import settings, tracking, stage_args, lineage

log = logging.getLogger("haven")


def cmd_register(args) -> int:
    from haven.predict.pyfunc import log_package
    from haven.track import RegisterFiles, register_model

    s = settings(args)
    lineage(args, s)
    trk = tracking(s)
    if trk is None:
        raise ValueError("register needs the project's tracking settings (project, experiment, results)")
    prefix = args.prefix if args.prefix is not None else s["registry_prefix"]
    metric = args.metric or s["best_metric"]
    files = RegisterFiles(Path(args.model), Path(args.run), Path(args.metrics), Path(args.report),
                          Path(args.onnx) if args.onnx else None, Path(args.onnx_report) if args.onnx_report else None)
    info = register_model(files, trk, f"{prefix}{s['project']}", metric=metric, log_model=log_package)
    out = Path(args.out)
    from haven.io import atomic_write_text

    atomic_write_text(out, json.dumps(info, indent=2, default=str))
    print(f"registered {info['name']} version {info['version']} ({info['alias']}: version {info['champion_version']})")
    return 0


def cmd_compare(args) -> int:
    from haven.io import atomic_write_text
    from haven.track import compare, format_comparison

    from haven import config as cfg

    if args.params:
        s = json.loads(args.params)
    elif args.config:
        s = cfg.compare_settings(cfg.load(args.config))
    else:
        raise SystemExit("give the projects with --params JSON or --config FILE")
    df = compare(s["projects"], s["results"], s["tracking_uri"], metric=s["best_metric"],
                 registry_prefix=s["registry_prefix"])
    out = Path(args.out) if args.out else Path(s["results"]) / "compare.csv"
    atomic_write_text(out, df.to_csv(index=False))
    print(format_comparison(df))
    print(f"\nwritten to {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("register", help="register the project's model in the MLflow model registry")
    p.add_argument("--model", required=True, help="the train stage's model.pt")
    p.add_argument("--run", required=True, help="the train stage's run.json (the MLflow run of the model)")
    p.add_argument("--metrics", required=True, help="the evaluate stage's metrics.json")
    p.add_argument("--report", required=True, help="where the project's report page will be (linked from the "
                                                   "version; not read: the report stage runs after register)")
    p.add_argument("--out", required=True, help="where to write registered.json")
    p.add_argument("--onnx", help="haven export-onnx's model.onnx (logged to the train run)")
    p.add_argument("--onnx-report", help="haven export-onnx's onnx.json, its parity record (logged beside it)")
    p.add_argument("--prefix", help="registered model name = PREFIX + project (default: config registry_prefix)")
    p.add_argument("--metric", help="metric that picks the `champion` version (default: config best_metric)")
    stage_args(p)
    p.set_defaults(func=cmd_register)
    p = sub.add_parser("compare", help="each project's best run and its metrics side by side (→ compare.csv)")
    p.add_argument("--params", help="settings as JSON (what the Snakemake rule passes)")
    p.add_argument("--config", help="config file (instead of --params)")
    p.add_argument("--out", help="CSV to write (default: <results>/compare.csv)")
    p.set_defaults(func=cmd_compare)

