"""What the report reads and writes: every path comes from the caller (the rule's declared inputs
and outputs, through ``haven report``); nothing here builds an upstream path of its own.

Only pseudonymous artefacts are read (counts, reasons, metrics, plots): the quarantine lists are
reduced to their reasons on reading, since their original paths often carry identifiers in
folder names.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml


@dataclass(frozen=True)
class Inputs:
    """The upstream files, one field each (rule report's ``input``)."""

    ingest_quarantine: Path
    anonymize_quarantine: Path
    audit: Path
    stats: Path
    best: Path
    trials: Path
    search: Path
    history: Path
    run: Path
    metrics: Path
    # evaluate plot name (the rule's output name, e.g. "roc") → its PNG; the page places each by name
    plots: dict[str, Path] = field(default_factory=dict)
    # predict source name → its summary.json (haven.predict.stage.summary): predictions on new data
    predict: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Outputs:
    """The files the report writes (rule report's ``output``)."""

    html: Path
    card: Path
    card_with_model: Path  # the card again, next to model.pt (train/model_card.md)
    curves: Path


@dataclass
class Artefacts:
    """The upstream files, read."""

    stats: dict
    metrics: dict
    audit: dict
    best: dict
    run: dict
    history: pd.DataFrame
    quarantine: list[tuple]  # (reason, files), ingest's reasons then anonymize's
    trials: pd.DataFrame | None
    predict: dict[str, dict] = field(default_factory=dict)  # source → its prediction summary


def quarantine_reasons(path: Path) -> list[tuple]:
    """(reason, files) of a quarantine list; the paths in it are never kept."""
    if not path.is_file():
        return []
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if df.empty:
        return []
    return [(reason, n) for reason, n in df["reason"].value_counts().items()]


def read_trials(path: Path) -> pd.DataFrame | None:
    # a project run by hand may have no search: the page then shows no trials table
    return pd.read_csv(path) if path.is_file() else None


def load(inputs: Inputs) -> Artefacts:
    return Artefacts(
        stats=json.loads(inputs.stats.read_text()),
        metrics=json.loads(inputs.metrics.read_text()),
        audit=json.loads(inputs.audit.read_text()),
        best=yaml.safe_load(inputs.best.read_text()),
        run=json.loads(inputs.run.read_text()),
        history=pd.read_csv(inputs.history),
        quarantine=quarantine_reasons(inputs.ingest_quarantine) + quarantine_reasons(inputs.anonymize_quarantine),
        trials=read_trials(inputs.trials),
        predict={name: read_summary(path) for name, path in sorted(inputs.predict.items())},
    )


def read_summary(path: Path) -> dict:
    """A predict source's summary.json (counts and means only: it holds no identifier)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: run the predict stage for that source first "
                                "(`snakemake ... predict`), or leave it out of `haven report --predict`")
    return json.loads(Path(path).read_text())


def image_data(path: Path) -> str | None:
    """A PNG as base64 for a data URI (the page travels alone), or None when it is missing."""
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None
