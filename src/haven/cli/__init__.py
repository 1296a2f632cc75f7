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

from haven.cli import (admin, deid, deidentify, fetch, ingest, learn, package, predict, report, results, serve, track,
                       trust)

MODULES = (admin, fetch, ingest, deid, deidentify, learn, trust, report, track, predict, package, results, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haven", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.add_commands(sub)
    # each stage merges its own shards: `haven merge ingest ...`, `haven merge anonymize ...`
    merge = sub.add_parser("merge", help="merge the tables of ingest or anonymize shards into the stage's outputs")
    stages = merge.add_subparsers(dest="stage", required=True)
    ingest.add_merge_command(stages)
    deid.add_merge_command(stages)
    fetch.add_merge_command(stages)
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

