# Helpers shared by the rules: paths and the per-stage settings handed to `haven`.
import json

from haven.cluster import cpus_per_gpu, rule_resources, site_settings
from haven.config import compare_settings, stage_settings
from haven.shards import shard_count

R = config["results"]
PROJECTS = list(config["projects"])
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


def source_inputs(wildcards):
    """The project's raw inputs: its demo dataset (made by rule demo_data) or the user's folder."""
    p = project(wildcards)
    if p["demo"]:
        return {"source": f"{DEMO_ROOT}/{p['demo']}"}
    inputs = {"source": p["source"]}
    if p["labels"]:
        inputs["labels"] = p["labels"]
    return inputs


def all_outputs():
    outputs = expand(P("report/index.html"), project=PROJECTS)
    if config["register_models"]:
        outputs += expand(P("track/registered.json"), project=PROJECTS)
    return outputs + [f"{R}/compare.csv"]
