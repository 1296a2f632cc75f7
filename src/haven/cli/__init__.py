"""The ``haven`` command line: one subcommand per stage, so every stage runs without Snakemake.

Each rule in ``rules/*.smk`` is one call of one of these subcommands.  Stage settings come
either from ``--params JSON`` (what the rules pass: the project's config sections, defaults
already filled in by the schema) or from ``--config FILE --project NAME`` (by hand).

The commands live beside each other by subsystem (``admin``, ``ingest``, ``deid``, ``learn``,
``trust``, ``report``, ``track``): each module's ``add_commands`` adds its subcommands, and each
handler only parses its arguments and calls the stage.
"""

from __future__ import annotations

import argparse
import logging
import sys

from haven.cli import admin, deid, ingest, learn, report, track, trust

MODULES = (admin, ingest, deid, learn, trust, report, track)


def cmd_merge(args) -> int:
    """`haven merge STAGE`: each stage merges its own shards."""
    return (ingest.cmd_merge if args.stage == "ingest" else deid.cmd_merge)(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haven", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.add_commands(sub)
    p = sub.add_parser("merge", help="merge the tables of ingest or anonymize shards into the stage's outputs")
    p.add_argument("stage", choices=["ingest", "anonymize"])
    p.add_argument("out", help="the stage's output folder")
    p.add_argument("shards", nargs="+", help="the shards' output folders")
    p.add_argument("--params", help="ingest: the label settings as JSON (to count label rows no file matched)")
    p.add_argument("--config", help="config file (instead of --params)")
    p.add_argument("--project", help="project name in the config (with --config)")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("distributed", "ray", "mlflow", "alembic", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from haven.cluster import SiteError
    from haven.config import ConfigError
    from haven.keys import KeyError_

    try:
        return int(args.func(args) or 0)
    except (ConfigError, SiteError, KeyError_, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"haven {args.command}: error: {exc}", file=sys.stderr)
        return 2

