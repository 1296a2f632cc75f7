"""Configuration: one JSON schema (workflow/schemas/config.schema.yaml) for Snakemake and the CLI.

The schema carries every default; :func:`load` validates a config file and fills the
defaults in, exactly like ``snakemake.utils.validate(config, schema)`` does at DAG start,
so a stage run by hand sees the same values as a stage run by the workflow.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration does not match the schema; the message names the key and the fix."""


def schema() -> dict:
    if not SCHEMA_PATH.is_file():  # pragma: no cover - only when installed without the repo
        raise ConfigError(f"config schema not found at {SCHEMA_PATH}")
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _validator():
    import jsonschema

    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop:
                    instance.setdefault(name, copy.deepcopy(prop["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def validate(config: dict, source: str = "config") -> dict:
    """Validate ``config`` in place, filling defaults; raise ConfigError naming the bad key."""
    validator = _validator()(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
            lines.append(f"  {key}: {err.message}")
        raise ConfigError(
            f"{source} is not a valid haven config:\n" + "\n".join(lines)
            + f"\nSee {SCHEMA_PATH.relative_to(SCHEMA_PATH.parents[2])} for every key, its type and default."
        )
    return config


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return validate(config, str(path))


PREDICT_DIR = "predict"


def dataset_name(project_name: str, source: str) -> str:
    """The name (and results sub-folder) of a project's new data source: ``<project>/predict/<source>``."""
    return f"{project_name}/{PREDICT_DIR}/{source}"


def _predict_dataset(config: dict, name: str) -> dict | None:
    """The project-like settings of a predict source (the gate rules run on it as on a project):
    the project's with its source, demo and PACS settings, no labels, and the DAG ending at the audit."""
    parent, sep, rest = name.partition(f"/{PREDICT_DIR}/")
    proj = config.get("projects", {}).get(parent) if sep else None
    entry = (proj or {}).get("predict", {}).get("sources", {}).get(rest)
    if entry is None:
        return None
    out = copy.deepcopy(proj)
    out.update(source=entry["source"], demo=entry.get("demo"), labels=None, unlabeled=True, until="audit",
               pacs=copy.deepcopy(entry["pacs"]) if entry.get("pacs") is not None else out["pacs"],
               experiment=experiment_name(config, parent))
    return out


def datasets(config: dict) -> list[str]:
    """Every dataset the gate rules (ingest, anonymize, audit) run on: the projects and their
    predict sources (:func:`dataset_name`)."""
    out = list(config.get("projects", {}))
    for name, proj in config.get("projects", {}).items():
        out += [dataset_name(name, s) for s in proj.get("predict", {}).get("sources", {})]
    return out


def project(config: dict, name: str) -> dict:
    """A project's settings, or those of a project's predict source by its :func:`dataset_name`."""
    try:
        return config["projects"][name]
    except KeyError:
        found = _predict_dataset(config, name)
        if found is not None:
            return found
        known = ", ".join(sorted(config.get("projects", {})))
        raise ConfigError(f"no project {name!r} in the config (known: {known})") from None


def experiment_name(config: dict, name: str) -> str:
    return project(config, name)["experiment"] or f"haven-{name}"


# The project's config sections each stage reads (its rule and `haven <stage> --config` alike);
# their digest is the stage's ``config_hash`` lineage tag.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": ("labels", "label_key", "label_column", "unlabeled", "until", "pacs"),  # pacs: also `haven fetch`
    "anonymize": ("anonymize",),
    "audit": ("anonymize", "audit"),
    "preprocess": ("task", "preprocess"),
    "tune": ("task", "model", "train", "tune"),
    "train": ("task", "model", "train"),
    "folds": ("cv",),
    "ensemble": ("task", "cv"),
    "evaluate": ("task", "evaluate", "tta"),
    "predict": ("task", "predict", "tta"),
    "reidentify": ("task", "predict", "anonymize"),  # task: what a DICOM SR states (haven report-sr)
    "report": ("task", "model", "train", "tune"),
    "register": ("model",),
}
# Stages that carry a segmentation's mask files with their images (only where the masks are: an
# ordinal option changed re-runs no ingest).
MASK_STAGES = ("ingest", "anonymize")


def mask_files(proj: dict) -> dict | None:
    """A segmentation project's mask files: ``{"folder": <mask folder or None: beside the images>,
    "suffix": ...}``; None for the other tasks (their ingest takes no file for a mask) and for unlabeled
    data: a predict source's new patients have no masks, and the training source's mask folder is
    not theirs (their ingest ran before, or without, the training data)."""
    if proj.get("task") != "segmentation" or proj.get("unlabeled"):
        return None
    seg = proj.get("segmentation", {})
    return {"folder": seg.get("masks"), "suffix": seg.get("mask_suffix", "_mask")}


# Stages that need to find the pseudonymization key: they get where it is, never the key itself
# (the audit: to check the keyed hashes of its accept list; reidentify: to join predictions back to the
# original ids through the keyed pseudonyms).
KEY_STAGES = ("anonymize", "audit", "reidentify")
# Top-level keys a stage needs beside its sections (not part of its config hash).
STAGE_GLOBALS: dict[str, tuple[str, ...]] = {"register": ("registry_prefix", "best_metric"),
                                             "predict": ("registry_prefix", "register_models")}


def stage_settings(config: dict, name: str, stage: str) -> dict:
    """The settings one stage of project ``name`` receives: the rules' ``--params`` and the CLI's
    ``--config/--project`` both come from here, so a stage sees the same values (and the same
    ``config_hash``) however it is run.  ``config`` must be validated (defaults filled in)."""
    if stage not in STAGE_SECTIONS:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGE_SECTIONS)})")
    proj = project(config, name)
    s = {k: copy.deepcopy(proj[k]) for k in STAGE_SECTIONS[stage]}
    if "task" in s:  # the task's own section (`multilabel:`, `ordinal:`; none for classification)
        s["task_options"] = copy.deepcopy(proj.get(s["task"], {}))
    if stage in MASK_STAGES:  # where a segmentation's mask files are, and nothing else of its task
        s["masks"] = mask_files(proj)
    s["config_hash"] = digest(s)
    s.update(project=name, seed=config["seed"], results=config["results"], tracking_uri=config["tracking_uri"],
             experiment=experiment_name(config, name))
    s.update({k: config[k] for k in STAGE_GLOBALS.get(stage, ())})
    if stage in KEY_STAGES:
        s.update(key_file=config["key_file"], key_env=config["key_env"], demo_key=config["demo_key"])
    return s


def default_settings(stage: str, source: str = ".") -> dict:
    """A stage's settings from the schema's defaults alone (a stage run by hand without a config)."""
    return stage_settings(validate({"projects": {"adhoc": {"source": str(source)}}}, "defaults"), "adhoc", stage)


def section_defaults(*path: str) -> dict:
    """A project section's defaults as the schema gives them (``section_defaults("anonymize", "pixels")``):
    for code called without a validated config (tests, notebooks), never a second copy in Python."""
    value = default_settings_project()
    for key in path:
        value = value[key]
    return copy.deepcopy(value)


@functools.lru_cache(maxsize=1)
def default_settings_project() -> dict:
    """A project made of the schema's defaults alone (cached: callers get deep copies)."""
    return validate({"projects": {"adhoc": {"source": "."}}}, "defaults")["projects"]["adhoc"]


def trained_projects(config: dict) -> list[str]:
    """The projects whose DAG goes on to training (``until: report``); the others stop at the audit
    (de-identification only) and have no model to compare or register."""
    return [p for p, settings in config["projects"].items() if settings["until"] != "audit"]


def cv_folds(settings: dict) -> int:
    """A project's cross-validation folds (0: none, one model trained on the train split)."""
    return int(settings.get("cv", {}).get("folds", 0))


def compare_settings(config: dict) -> dict:
    """What `haven compare` (and rule compare) needs: every project's experiment and the registry."""
    return {"projects": {p: experiment_name(config, p) for p in trained_projects(config)},
            **{k: config[k] for k in ("results", "tracking_uri", "best_metric", "registry_prefix")}}


def digest(obj: Any) -> str:
    """A stable short hash of a JSON-able object (used as the config hash tag)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def with_defaults(given: dict | None, defaults: dict, section: str) -> dict:
    """``defaults`` updated by ``given``; a key ``defaults`` lacks is an error naming ``section``."""
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {section} option(s): {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(defaults)})")
    return {**defaults, **(given or {})}
