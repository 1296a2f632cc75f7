"""haven report: the project's HTML page and model card."""

from __future__ import annotations

import logging
from pathlib import Path

from haven.cli.common import settings, stage_args

log = logging.getLogger("haven")


def cmd_report(args) -> int:
    from haven.report.page import project_report

    s = settings(args)
    path = project_report(Path(args.results), Path(args.out), s)
    print(f"report written to {path}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="per-project HTML summary and model card")
    p.add_argument("results", help="the project's results folder")
    p.add_argument("out")
    stage_args(p)
    p.set_defaults(func=cmd_report)

