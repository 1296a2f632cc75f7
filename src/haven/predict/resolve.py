"""Which model a prediction applies (the ``predict.model`` setting) → a :class:`Bundle`.

* ``this_run`` (or ``champion`` without a registry): the train stage's ``model.pt`` with evaluate's
  ``metrics.json``, the files the rule names;
* ``champion``: the registered model's alias, as ``track/registered.json`` names the model;
* an MLflow model URI (``models:/name/3``, ``models:/name@alias``, ``runs:/<run>/model``): the
  pyfunc package (:mod:`haven.predict.pyfunc`) downloaded from the tracking server.
"""

from __future__ import annotations

import json
from pathlib import Path

from haven.predict.bundle import Bundle


def registered_uri(registered: Path) -> str:
    """The champion's URI from ``registered.json`` (what the register stage wrote)."""
    r = json.loads(Path(registered).read_text())
    return f"models:/{r['name']}@{r['alias']}"


def bundle_for(settings: dict, *, model: Path | None = None, evaluation: Path | None = None,
               registered: Path | None = None) -> Bundle:
    """The bundle the ``predict`` settings (a stage's, :func:`haven.config.stage_settings`) ask for."""
    tta = settings.get("tta")
    if model is not None:
        return Bundle.load(model, evaluation, tta=tta, name=f"{settings.get('registry_prefix', '')}"
                                                          f"{settings.get('project', '')}", version="this run")
    choice = settings["predict"]["model"]
    if registered is not None:
        uri = registered_uri(registered)
    elif "://" in choice or choice.startswith(("models:/", "runs:/")):
        uri = choice
    else:
        raise ValueError(f"predict.model {choice!r} needs the train stage's files (this_run) or the registry's "
                         "registered.json (champion): run the project's pipeline first, or give an MLflow model URI")
    from haven.predict.pyfunc import load_bundle
    from haven.track import session

    tracking = {"results": settings["results"], "uri": settings.get("tracking_uri"),
                "experiment": settings["experiment"], "project": settings["project"]}
    with session(tracking):
        return load_bundle(uri, tta=tta)
