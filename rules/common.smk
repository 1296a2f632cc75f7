# Helpers shared by the rules: paths and the per-stage settings handed to `haven`.
import json
import re
import shlex
from types import SimpleNamespace

from haven.cluster import cpus_per_gpu, rule_resources, site_settings
from haven.config import compare_settings, cv_folds, mask_files, dataset_name, datasets, project as project_settings, stage_settings, trained_projects
from haven.shards import remote_source, shard_count

R = config["results"]
PROJECTS = list(config["projects"])
# The gate rules (fetch, ingest, anonymize, audit) run on every dataset: each project's own data and
# each of its predict sources, named <project>/predict/<source> (their results folder); the
# wildcard {project} of those rules takes either.  The other rules take projects only.
DATASETS = datasets(config)
# projects that go on to training; the others (`until: audit`) end at the audit (de-identification only)
TRAINED = trained_projects(config)
# cross-validated projects (`cv.folds` >= 2) → their folds: rule ensemble makes their train/model.pt
# from one train_fold job per fold (rules/cv.smk); the others' comes from rule train
CV = {p: cv_folds(config["projects"][p]) for p in TRAINED if cv_folds(config["projects"][p])}
DEMO_ROOT = "data/demo"
# The cluster's own Slurm values (partition, account, GPU model, ...) from ~/.config/haven/site.yaml
# or HAVEN_SLURM_* variables (haven.cluster); every rule adds them to its resources.
SITE = site_settings()
CPU_SITE = rule_resources("cpu", SITE)
GPU_SITE = rule_resources("gpu", SITE)
# Ingest and anonymize run as shards (haven.shards): `shards`, or files / `files_per_shard`.
SHARDS = {name: shard_count(project_settings(config, name)) for name in DATASETS}


wildcard_constraints:
    project="|".join(DATASETS),
    shard=r"\d+",


def one_of(names):
    """A wildcard constraint matching exactly these names (none: a pattern that matches nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def fold_paths(path):
    """Input function: ``path`` (with {fold}) for every fold of the project."""
    return lambda w: expand(P(path), project=w.project, fold=range(CV[w.project]))


def fold_train_stores(w, input):
    """The fold stores (inside the folds folder, a declared input) fold w.fold trains on: the others."""
    return " ".join(shlex.quote(f"{input.folds}/{j}.zarr") for j in range(CV[w.project]) if j != int(w.fold))


def fold_val_store(w, input):
    """The fold's own store: its validation split."""
    return f"{input.folds}/{w.fold}.zarr"


def P(path):
    """A path under the project's results folder (keeps the {project} wildcard)."""
    return f"{R}/{{project}}/{path}"


def project(wildcards):
    """The settings of the rule's project, or of the predict source it names (haven.config.project)."""
    return project_settings(config, wildcards.project)


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
    masks = mask_files(p)
    if masks and masks["folder"]:  # a segmentation's mask folder beside the source: read by ingest and anonymize
        inputs["masks"] = masks["folder"]
    return inputs


def all_outputs():
    outputs = expand(P("anonymize/audit.json"), project=[p for p in PROJECTS if p not in TRAINED])
    if not TRAINED:
        return outputs  # de-identification only: no model to report, register or compare
    outputs += expand(P("report/index.html"), project=TRAINED)
    outputs += predict_outputs()
    if config["register_models"]:
        outputs += expand(P("track/registered.json"), project=TRAINED)
    return outputs + [f"{R}/compare.csv"]


def predict_sources(name):
    """The names of a project's predict sources."""
    return list(config["projects"][name]["predict"]["sources"])


def predict_outputs():
    """Every trained project's predictions table per predict source, its re-identified copy and (with
    predict.sr) its DICOM SRs, both in the source's PHI zone (rules/predict.smk)."""
    out = []
    for p in TRAINED:
        for s in predict_sources(p):
            out += [f"{R}/{p}/predict/{s}/predictions.csv", f"{R}/{p}/predict/{s}/ingest/predictions.reidentified.csv"]
            if config["projects"][p]["predict"]["sr"]:
                out.append(f"{R}/{p}/predict/{s}/ingest/sr")
    return out


# the predict rules (rules/predict.smk): wildcards project and source; the source's dataset is
# <project>/predict/<source>, whose gate outputs lie under its own results folder
def source_dataset(w):
    return dataset_name(w.project, w.source)


def dataset_path(path):
    """Input function: ``path`` under the predict source's results folder."""
    return lambda w: f"{R}/{source_dataset(w)}/{path}"


def dataset_shards(path):
    return lambda w: expand(f"{R}/{source_dataset(w)}/{path}", shard=range(SHARDS[source_dataset(w)]))


def model_inputs(w):
    """The model predict applies: this run's files, the registry's champion (registered.json names
    it), or an MLflow URI from the config (nothing of the DAG's)."""
    choice = config["projects"][w.project]["predict"]["model"]
    if choice == "this_run" or (choice == "champion" and not config["register_models"]):
        return {"model": P("train/model.pt").format(project=w.project),
                "evaluation": P("evaluate/metrics.json").format(project=w.project)}
    if choice == "champion":
        return {"registered": P("track/registered.json").format(project=w.project)}
    return {}


def model_args(w, input):
    return " ".join(f"--{k} {shlex.quote(str(input[k]))}" for k in ("model", "evaluation", "registered") if k in input.keys())


# The predict source's own dataset, as the gate rules see it (its settings: haven.config.project of
# <project>/predict/<source>): where its original files are, for the SRs' evidence.
def source_wildcards(w):
    return SimpleNamespace(project=source_dataset(w))


def dataset_settings(stage):
    return lambda w: json.dumps(stage_settings(config, source_dataset(w), stage), sort_keys=True)


def sr_store_args(w):
    """`--store-url --pacs` when the reports go back to the PACS (predict.store_sr, a dicomweb source)."""
    p = project(source_wildcards(w))
    if not (p["predict"]["store_sr"] and remote_source(p["source"])):
        return ""
    return f"--store-url {shlex.quote(p['source'])} --pacs {shlex.quote(json.dumps(p['pacs'], sort_keys=True))}"


def report_predict_inputs(w):
    """Source → summary.json of the project's predict sources (rules/predict.smk); register does not
    wait for this page, so a source predicted with the registry's champion is shown too."""
    return {s: f"{R}/{w.project}/predict/{s}/summary.json" for s in predict_sources(w.project)}
