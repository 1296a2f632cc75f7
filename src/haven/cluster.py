"""Cluster settings: a site's own Slurm values, and installing the profiles where Snakemake looks.

A cluster's partition, account, GPU model, constraint and QOS are the site's, not the
workflow's: they come from a small user file or from environment variables, never from edits
to ``profiles/slurm``.  The rules read them once at DAG build (``rules/common.smk``) and add
them to their resources, so snakemake-executor-plugin-slurm turns them into ``sbatch`` flags
(``-p``, ``-A``, ``--gpus=<model>:N``, ``-C``, ``--qos``).  ``--set-resources`` on the command
line or in a profile still wins over them.

The file is ``$HAVEN_SITE``, else ``$XDG_CONFIG_HOME/haven/site.yaml`` (``~/.config/haven/site.yaml``)::

    partition: cpu          # CPU rules (ingest, anonymize, preprocess, evaluate, ...)
    gpu_partition: gpu      # tune and train (default: partition)
    account: mylab          # only on clusters with accounting (checked with sacctmgr)
    gpu_model: a100         # --gpus=a100:N
    constraint: ""          # -C for CPU rules
    gpu_constraint: "a100|h100"
    qos: normal
    cpus_per_gpu: 8         # tune and train ask --cpus-per-gpu instead of --cpus-per-task

and every key can be set (and overridden) by ``HAVEN_SLURM_<KEY>`` (``HAVEN_SLURM_PARTITION``,
``HAVEN_SLURM_GPU_MODEL``, ...).  An empty value means "not set".
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

#: site key -> what it means (the env variable is HAVEN_SLURM_<KEY upper>)
SITE_KEYS = {
    "partition": "partition of the CPU rules (sbatch -p)",
    "gpu_partition": "partition of the GPU rules tune and train (default: partition)",
    "account": "account to charge (sbatch -A; only where Slurm has accounting)",
    "gpu_model": "GPU model for tune and train (sbatch --gpus=MODEL:N)",
    "constraint": "node features of the CPU rules (sbatch -C)",
    "gpu_constraint": "node features of the GPU rules (sbatch -C)",
    "qos": "quality of service (sbatch --qos)",
    "cpus_per_gpu": "CPUs per GPU for tune and train (sbatch --cpus-per-gpu; integer)",
}
ENV_PREFIX = "HAVEN_SLURM_"
#: the folder of the shipped profiles (a checkout: src/haven/../../profiles)
PROFILES = Path(__file__).resolve().parents[2] / "profiles"


class SiteError(ValueError):
    """The site file or a HAVEN_SLURM_* variable is unusable; the message names it and the fix."""


def site_file(env=None) -> Path:
    env = os.environ if env is None else env
    if env.get("HAVEN_SITE"):
        return Path(env["HAVEN_SITE"]).expanduser()
    base = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")).expanduser() / ".config")
    return base / "haven" / "site.yaml"


def site_settings(env=None) -> dict:
    """The site's Slurm values: the site file, then HAVEN_SLURM_* variables over it; empty ones dropped."""
    env = os.environ if env is None else env
    path = site_file(env)
    values: dict = {}
    if path.is_file():
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SiteError(f"{path} is not valid YAML ({exc}); fix it or remove it") from None
        if not isinstance(values, dict):
            raise SiteError(f"{path} must be a mapping of {', '.join(SITE_KEYS)}")
        unknown = sorted(set(values) - set(SITE_KEYS))
        if unknown:
            raise SiteError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SITE_KEYS)}")
    elif "HAVEN_SITE" in env and env["HAVEN_SITE"]:
        raise SiteError(f"HAVEN_SITE points at {path}, which is not a file")
    for key in SITE_KEYS:
        var = ENV_PREFIX + key.upper()
        if var in env:
            values[key] = env[var]
    out = {k: str(v).strip() for k, v in values.items() if v is not None and str(v).strip() != ""}
    if "cpus_per_gpu" in out:
        source = f"{ENV_PREFIX}CPUS_PER_GPU" if f"{ENV_PREFIX}CPUS_PER_GPU" in env else str(path)
        try:
            out["cpus_per_gpu"] = int(out["cpus_per_gpu"])
        except ValueError:
            raise SiteError(f"{source}: cpus_per_gpu must be an integer, not {out['cpus_per_gpu']!r}") from None
        if out["cpus_per_gpu"] < 1:
            raise SiteError(f"{source}: cpus_per_gpu must be >= 1")
    return out


def rule_resources(kind: str, site: dict) -> dict:
    """The resources a rule of ``kind`` ("cpu" or "gpu") gets from the site settings."""
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"kind must be cpu or gpu, not {kind!r}")
    res: dict = {}
    partition = site.get("gpu_partition" if kind == "gpu" else "partition") or site.get("partition")
    if partition:
        res["slurm_partition"] = partition
    if site.get("account"):
        res["slurm_account"] = site["account"]
    if site.get("qos"):
        res["qos"] = site["qos"]
    constraint = site.get("gpu_constraint" if kind == "gpu" else "constraint")
    if constraint:
        res["constraint"] = constraint
    if kind == "gpu" and site.get("gpu_model"):
        res["gpu_model"] = site["gpu_model"]
    return res


def cpus_per_gpu(site: dict, threads: int, gpus: int = 1) -> int:
    """``--cpus-per-gpu`` of a GPU rule: the site's value, else the rule's threads over its GPUs
    (so the data loaders of one GPU get the CPUs the rule was sized for)."""
    return int(site.get("cpus_per_gpu") or max(1, int(threads) // max(1, int(gpus))))


def profile_home(env=None) -> Path:
    """Where Snakemake looks up a profile given by name (the user's config folder)."""
    env = os.environ if env is None else env
    base = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")).expanduser() / ".config")
    return base / "snakemake"


def install_profiles(names: list[str], dest: Path | None = None, force: bool = False) -> list[Path]:
    """Copy ``profiles/<name>/`` to ``dest/<name>/`` (default: :func:`profile_home`), so that
    ``snakemake --profile <name>`` finds it.  An existing different profile is kept unless ``force``."""
    dest = Path(dest) if dest else profile_home()
    written = []
    for name in names:
        src = PROFILES / name
        if not (src / "config.yaml").is_file():
            known = ", ".join(sorted(p.name for p in PROFILES.iterdir() if (p / "config.yaml").is_file()))
            raise FileNotFoundError(f"no profile {name!r} in {PROFILES} (known: {known})")
        target = dest / name
        if target.exists() and not force:
            same = all((target / f.name).is_file() and (target / f.name).read_bytes() == f.read_bytes()
                       for f in src.iterdir() if f.is_file())
            if not same:
                raise FileExistsError(f"{target} exists and differs from {src}: keep it, or re-run with --force "
                                      "to replace it")
        target.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, target / f.name)
        written.append(target)
    return written
