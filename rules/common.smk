# Helpers shared by the rules: paths and the per-stage settings handed to `haven`.
import json

from haven.cluster import cpus_per_gpu, rule_resources, site_settings
from haven.config import digest
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


def settings(*sections, secrets=False):
    """Rule params: the project's config sections a stage needs, as JSON for `--params`."""

    def _settings(wildcards):
        p = project(wildcards)
        s = {k: p[k] for k in sections}
        s["config_hash"] = digest(s)
        s.update(
            project=wildcards.project,
            seed=config["seed"],
            results=R,
            tracking_uri=config["tracking_uri"],
            experiment=p["experiment"] or f"haven-{wildcards.project}",
        )
        if secrets:  # where to find the key, never the key itself
            s.update(
                key_file=config["key_file"],
                key_env=config["key_env"],
                demo_key=config["demo_key"],
            )
        return json.dumps(s, sort_keys=True)

    return _settings


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
