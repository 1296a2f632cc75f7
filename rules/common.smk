# Helpers shared by the rules: paths and the per-stage settings handed to `haven`.
import json

from haven.cluster import cpus_per_gpu, rule_resources, site_settings
from haven.config import compare_settings, stage_settings, trained_projects
from haven.shards import remote_source, shard_count

R = config["results"]
PROJECTS = list(config["projects"])
# projects that go on to training; the others (`until: audit`) end at the audit (de-identification only)
TRAINED = trained_projects(config)
DEMO_ROOT = "data/demo"
# The cluster's own Slurm values (partition, account, GPU model, ...) from ~/.config/haven/site.yaml
# or HAVEN_SLURM_* variables (haven.cluster); every rule adds them to its resources.
SITE = site_settings()
CPU_SITE = rule_resources("cpu", SITE)
GPU_SITE = rule_resources("gpu", SITE)
# Ingest and anonymize run as shards (haven.shards): `shards`, or files / `files_per_shard`.
SHARDS = {name: shard_count(p) for name, p in config["projects"].items()}


wildcard_constraints:
    project="|".join(PROJECTS),
    shard=r"\d+",


def P(path):
    """A path under the project's results folder (keeps the {project} wildcard)."""
    return f"{R}/{{project}}/{path}"


def project(wildcards):
    return config["projects"][wildcards.project]


def shard_paths(path):
    """Input function: ``path`` (with {shard}) for every shard of the project."""
    return lambda w: expand(P(path), project=w.project, shard=range(SHARDS[w.project]))


def settings(stage):
    """Rule params: the stage's settings as JSON for `--params` (haven.config.stage_settings, the same
    builder `haven <stage> --config FILE --project NAME` uses)."""
    return lambda w: json.dumps(stage_settings(config, w.project, stage), sort_keys=True)


def fetched_folder(name):
    """Where a dicomweb project's instances are fetched to (rules/fetch.smk): PHI zone, under ingest."""
    return f"{R}/{name}/ingest/pacs/data"


def source_folder(wildcards):
    """The folder ingest walks: the project's `source`, or for a dicomweb:// source the fetched one."""
    p = project(wildcards)
    return fetched_folder(wildcards.project) if remote_source(p["source"]) else p["source"]


def source_inputs(wildcards):
    """The project's raw inputs: its demo dataset (made by rule demo_data), the user's folder, or for
    a dicomweb:// source the fetch's merged listing (rule fetch; the instances lie beside it)."""
    p = project(wildcards)
    if p["demo"]:
        return {"source": f"{DEMO_ROOT}/{p['demo']}"}
    remote = remote_source(p["source"])
    inputs = {"source": P("ingest/pacs/listing.csv").format(project=wildcards.project) if remote else p["source"]}
    if p["labels"]:
        inputs["labels"] = p["labels"]
    return inputs


def all_outputs():
    outputs = expand(P("anonymize/audit.json"), project=[p for p in PROJECTS if p not in TRAINED])
    if not TRAINED:
        return outputs  # de-identification only: no model to report, register or compare
    outputs += expand(P("report/index.html"), project=TRAINED)
    if config["register_models"]:
        outputs += expand(P("track/registered.json"), project=TRAINED)
    return outputs + [f"{R}/compare.csv"]
