"""Helpers every command module shares: stage settings, tracking settings, lineage, common flags."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

def settings(args, stage: str | None = None) -> dict:
    """The stage's settings: --params JSON (what the rules pass), else --config/--project through the
    rules' own builder (haven.config.stage_settings), else the schema's defaults."""
    from haven import config as cfg

    stage = stage or args.command
    if getattr(args, "params", None):
        # the rules pass every key; by hand, a config section left out gets the schema's defaults
        # (where the key is and whether to create a demo key are never defaulted: they stay as given)
        defaults = cfg.default_settings(stage, getattr(args, "source", "."))
        return {**{k: defaults[k] for k in ("seed", *cfg.STAGE_SECTIONS[stage])}, **json.loads(args.params)}
    if getattr(args, "config", None):
        if not getattr(args, "project", None):
            raise cfg.ConfigError(f"--config needs --project NAME for haven {args.command}")
        return cfg.stage_settings(cfg.load(args.config), args.project, stage)
    return cfg.default_settings(stage, getattr(args, "source", "."))


def tracking(s: dict, **extra) -> dict | None:
    if s.get("track") is False:
        return None
    keys = ("project", "experiment", "results", "config_hash")
    if not all(s.get(k) for k in keys):
        return None
    return {**{k: s[k] for k in keys}, "uri": s.get("tracking_uri"), **extra}


def stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", help="stage settings as JSON (what the Snakemake rules pass)")
    p.add_argument("--config", help="config file (instead of --params)")
    p.add_argument("--project", help="project name in the config (with --config)")
    p.add_argument("--rule", help="Snakemake rule name (an MLflow lineage tag)")


def data_hash(stats: Path) -> str | None:
    """The audited data's hash that preprocess recorded in its stats.json (a lineage tag)."""
    return json.loads(Path(stats).read_text()).get("data_manifest_hash") if Path(stats).is_file() else None


def lineage(args, s: dict | None = None) -> None:
    """Snakemake rule and wildcards for the lineage tags (rules pass --rule; the wildcard is the project)."""
    if getattr(args, "rule", None):
        os.environ["HAVEN_RULE"] = args.rule
        project = (s or {}).get("project") or getattr(args, "project", None)
        if project:
            os.environ.setdefault("HAVEN_WILDCARDS", f"project={project}")
