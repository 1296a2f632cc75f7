"""haven report: the project's HTML page and model card."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from haven.cli.common import settings, stage_args, tracking

log = logging.getLogger("haven")

# flag → haven.report.artefacts.Inputs / Outputs field: every file is named on the command line
# (rule report passes its declared inputs and outputs), the report builds no path of its own
INPUTS = {
    "--ingest-quarantine": "ingest's quarantine.csv (reasons only are read)",
    "--anonymize-quarantine": "anonymize's quarantine.csv (reasons only are read)",
    "--audit": "anonymize/audit.json",
    "--stats": "preprocess/stats.json",
    "--best": "tune/best_config.yaml",
    "--trials": "tune/trials.csv",
    "--search": "tune/search.png",
    "--history": "train/history.csv",
    "--run": "train/run.json",
    "--metrics": "evaluate/metrics.json",
}
OUTPUTS = {
    "--html": "the page (report/index.html)",
    "--card": "the model card (report/model_card.md)",
    "--card-with-model": "the model card again, next to the model (train/model_card.md)",
    "--curves": "the training curves it draws (report/training_curves.png)",
}


def _field(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _plot(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def cmd_report(args) -> int:
    from haven.report.artefacts import Inputs, Outputs
    from haven.report.page import project_report

    s = settings(args)
    twice = sorted({n for n, _ in args.predict if [m for m, _ in args.predict].count(n) > 1})
    if twice:  # dict() below would silently keep the last summary
        raise ValueError(f"--predict names a source twice: {', '.join(twice)}")
    inputs = Inputs(**{_field(k): Path(getattr(args, _field(k))) for k in INPUTS}, plots=dict(args.plot),
                    predict=dict(args.predict))
    outputs = Outputs(**{_field(k): Path(getattr(args, _field(k))) for k in OUTPUTS})
    path = project_report(inputs, outputs, s)
    trk = tracking(s)
    if trk is not None:  # the registered version links to the page in the train run (haven.track.log_report)
        from haven.track import log_report

        log_report(trk, inputs.run, [outputs.html, outputs.card])
    print(f"report written to {path}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="per-project HTML summary and model card")
    for flag, what in {**INPUTS, **OUTPUTS}.items():
        p.add_argument(flag, required=True, metavar="PATH", help=what)
    p.add_argument("--plot", type=_plot, action="extend", nargs="+", default=[], metavar="NAME=PATH",
                   help="an evaluate plot, by its name in rule evaluate's outputs (confusion, roc, ...); "
                        "a plot not given shows as not available")
    p.add_argument("--predict", type=_plot, action="extend", nargs="*", default=[], metavar="SOURCE=PATH",
                   help="a predict source's summary.json (predict/<source>/summary.json), by the source's name")
    stage_args(p)
    p.set_defaults(func=cmd_report)
