"""Slurm end to end: the demo DAG submitted job by job with ``sbatch`` to a real Slurm.

A private one-node cluster (munged, slurmctld, slurmd from Debian's slurm-wlm, started as root
by ``tests/slurm/start.sh``, no systemd, no accounting, one fake GPU) runs the pipeline that
``snakemake --profile profiles/slurm`` submits through snakemake-executor-plugin-slurm.  The
profile used is the shipped one with only what a 2-CPU test node and a fast test need changed
(see :func:`slurm_test_profile`); the GPU requests of tune and train are kept and served by the fake
GPU.

Without Slurm (or root) the tests skip; in CI (``HAVEN_SLURM_REQUIRED=1`` or ``CI`` set, after
``.ci/system-setup``) they fail instead.  The dry-run test needs no Slurm at all.
"""

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent / "slurm"
SBIN = ("/usr/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "srun")
PARTITION = "haven"
#: Slurm client programs, hidden from PATH for the "laptop without Slurm" dry run
SLURM_PROGRAMS = {"sbatch", "srun", "salloc", "squeue", "sacct", "sinfo", "scontrol", "scancel", "sacctmgr",
                  "sshare", "sstat", "sprio", "sreport", "sattach", "sbcast", "scrontab", "sdiag", "strigger",
                  "sh5util", "sjstat", "sjobexitmod", "smap", "sview", "seff", "slurmd", "slurmctld",
                  "slurmstepd", "slurmdbd"}


def _required() -> bool:
    return os.environ.get("HAVEN_SLURM_REQUIRED", "") not in ("", "0") or os.environ.get("CI", "") not in (
        "", "0", "false")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _missing() -> str | None:
    """Why this machine cannot run the Slurm tests, or None."""
    absent = [b for b in DAEMONS + CLIENTS if not _which(b)]
    if absent:
        return (f"Slurm/MUNGE not installed (missing: {', '.join(absent)}); "
                "run .ci/system-setup (apt-get install slurm-wlm munge) to run the Slurm end-to-end test")
    if os.geteuid() != 0:
        return "the Slurm end-to-end test starts munged, slurmctld and slurmd and must run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*cmd: str, timeout: int = 60) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node Slurm for this session; SLURM_CONF points at it while it lives."""
    why = _missing()
    if why:
        if _required():
            pytest.fail(f"CI must run the Slurm end-to-end test: {why}")
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    if len(str(d)) > 60:  # unix sockets (munge, slurmd's step sockets) must fit in 108 bytes
        d = Path(tempfile.mkdtemp(prefix="haven-slurm-"))
    env = dict(os.environ, HAVEN_SLURM_PARTITION=PARTITION, HAVEN_SLURM_GPUS="1",
               HAVEN_SLURMCTLD_PORT=str(_free_port()), HAVEN_SLURMD_PORT=str(_free_port()))
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
    try:
        start = subprocess.run([str(HERE / "start.sh"), str(d)], env=env, capture_output=True, text=True,
                               timeout=180)
        assert start.returncode == 0, f"Slurm did not start:\n{start.stdout}\n{start.stderr}"
        saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
        os.environ["SLURM_CONF"] = str(d / "slurm.conf")
        # DIR/bin/srun: for the srun the jobstep plugin runs inside each job (see start.sh)
        os.environ["PATH"] = os.pathsep.join([str(d / "bin"), os.environ["PATH"]])
        node = socket.gethostname().split(".")[0]
        info = dict(line.split("=", 1) for line in sh("scontrol", "show", "node", node, "-o").split()
                    if "=" in line)
        yield {"dir": d, "conf": d / "slurm.conf", "node": node, "cpus": int(info["CPUTot"]),
               "mem_mb": int(info["RealMemory"]), "partition": PARTITION}
    finally:
        subprocess.run([str(HERE / "stop.sh"), str(d)], env=env, capture_output=True, timeout=60)
        for k, v in (locals().get("saved") or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def slurm_test_profile(root: Path, dest: Path, cluster: dict) -> Path:
    """The shipped profiles/slurm, fitted to the one small test node and made quick to poll.

    Kept as shipped: executor, status command (squeue), default resources, the GPU requests of
    tune and train, retries off only so that a failure shows at once.  Changed: threads and
    memory capped to what the node has (the shipped ones are sized for a real cluster), status
    checks every 2 s instead of the cluster-friendly defaults, and the Slurm logs of successful
    jobs kept for inspection.  The partition is not in the profile: it comes the way a site's
    values do, from HAVEN_SLURM_* variables (haven.cluster), set by :func:`slurm_run`.
    """
    prof = yaml.safe_load((root / "profiles" / "slurm" / "config.yaml").read_text())
    cap_mem = cluster["mem_mb"] // 2
    prof["set-threads"] = {r: min(int(n), cluster["cpus"]) for r, n in (prof.get("set-threads") or {}).items()}
    for res in [prof.setdefault("default-resources", {}), *(prof.get("set-resources") or {}).values()]:
        if "mem_mb" in res:
            res["mem_mb"] = min(int(res["mem_mb"]), cap_mem)
    assert prof["slurm-requeue"] is True and prof["retries"] >= 1  # shipped: preempted jobs are requeued
    prof.update({"seconds-between-status-checks": 2, "slurm-init-seconds-before-status-checks": 2,
                 "latency-wait": 5, "retries": 0, "slurm-keep-successful-logs": True})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return dest


#: the demo, made small: this test is about orchestration (test_pipeline checks what is learnt)
SMALL = {"preprocess": {"size": 32},
         "train": {"epochs": 2, "freeze_epochs": 1},
         "tune": {"num_samples": 2, "max_epochs": 1},
         "evaluate": {"bootstrap": 50, "explain_per_class": 1, "ig_steps": 4, "randomization_samples": 2,
                      "pgd_steps": 2, "attack_samples": 8, "epsilons": [0, 0.03]}}


def small_demo_config(root: Path) -> dict:
    """The embedded demo config made small: two projects on the brain-ct demo data (the smaller
    demo; two projects so that jobs run side by side and `compare` has something to compare),
    with the SMALL settings the config schema knows about."""
    conf = yaml.safe_load((root / "config.yaml").read_text())
    if "brain-ct" in conf["projects"]:
        ct = conf["projects"]["brain-ct"]
        conf["projects"] = {"brain-ct": ct, "brain-ct-b": copy.deepcopy(ct)}
    schema = yaml.safe_load((root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    known = schema["$defs"]["project"]["properties"]
    for p in conf["projects"].values():
        for section, values in SMALL.items():
            props = known.get(section, {}).get("properties", {})
            p.setdefault(section, {}).update({k: v for k, v in values.items() if k in props})
    return conf


def squeue_jobs(run_id: str) -> dict[str, dict]:
    """Every job of this Snakemake run that slurmctld knows (finished ones for MinJobAge)."""
    out = sh("squeue", "--states=all", "--noheader", "--name", run_id, "--format=%i|%T|%k|%P")
    jobs = {}
    for line in out.splitlines():
        jobid, state, comment, partition = line.split("|")
        jobs[jobid] = {"state": state, "comment": comment, "partition": partition}
    return jobs


@pytest.fixture(scope="module")
def slurm_run(root, slurm_cluster, tmp_path_factory):
    """The (small) demo run by `snakemake --profile <slurm profile>` from its working directory."""
    work = tmp_path_factory.mktemp("slurm-demo")
    conf = small_demo_config(root)
    (work / "config.yaml").write_text(yaml.safe_dump(conf))
    profile = slurm_test_profile(root, tmp_path_factory.mktemp("profile") / "slurm", slurm_cluster)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--profile", str(profile),
           "--configfile", str(work / "config.yaml"), "--verbose"]
    # the site's values: CPU rules on the partition, GPU rules with 1 CPU per GPU (the node has 2)
    env = dict(os.environ, HAVEN_SLURM_PARTITION=slurm_cluster["partition"], HAVEN_SLURM_CPUS_PER_GPU="1",
               HAVEN_SITE=str(work / "no-site.yaml"))
    (work / "no-site.yaml").write_text("{}\n")
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=2400)
    elapsed = time.monotonic() - t0
    log = run.stdout + run.stderr
    (work / "snakemake-slurm.log").write_text(log)
    if run.returncode != 0:
        tails = []
        failed = set(re.findall(r"Error in rule \w+:\n(?:.*\n){0,8}?\s+log: (\S+?),? ", log))  # their own logs
        for f in sorted((work / ".snakemake" / "slurm_logs").rglob("*.log"))[-4:] + [work / f for f in failed]:
            if f.is_file():
                tails.append(f"--- {f.relative_to(work)}\n{f.read_text()[-2500:]}")
        pytest.fail(f"snakemake --profile slurm failed ({elapsed:.0f} s):\n{log[-8000:]}\n" + "\n".join(tails))
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log))
    print(f"\nslurm end-to-end: {len(submitted)} Slurm jobs in {elapsed:.0f} s (run {run_id}, log "
          f"{work / 'snakemake-slurm.log'})")
    return {"work": work, "conf": conf, "log": log, "run_id": run_id, "submitted": submitted, "elapsed": elapsed}


def test_every_rule_ran_as_a_slurm_job(slurm_run):
    log, submitted = slurm_run["log"], slurm_run["submitted"]
    remote = re.findall(r"^rule (\w+):$", log, re.M)
    local = re.findall(r"^localrule (\w+):$", log, re.M)
    merges = {"all", "ingest", "anonymize"}  # rule all and the merges of the shards' tables are local rules
    assert set(local) <= merges, f"rules run outside Slurm: {sorted(set(local) - merges)}"
    assert len(remote) >= 9 * len(slurm_run["conf"]["projects"]) and len(submitted) == len(remote)
    jobs = squeue_jobs(slurm_run["run_id"])
    assert set(jobs) == set(submitted.values()), "squeue does not list exactly the submitted jobs"
    assert {j["state"] for j in jobs.values()} == {"COMPLETED"}, jobs
    assert {j["partition"] for j in jobs.values()} == {PARTITION}
    # one job per (rule, wildcards) and every rule of the DAG is among them
    comments = sorted(j["comment"] for j in jobs.values())
    assert len(set(comments)) == len(comments)
    assert {c.split("_wildcards_")[0].removeprefix("rule_") for c in comments} == set(remote)
    # slurmctld's own record of finished jobs (jobcomp/filetxt) agrees
    record = (Path(os.environ["SLURM_CONF"]).parent / "jobcomp.txt").read_text()
    done = dict(re.findall(r"JobId=(\d+) .*?JobState=(\S+)", record))
    assert all(done.get(j) == "COMPLETED" for j in submitted.values()), done


def test_gpu_jobs_got_a_gpu_and_valid_sbatch_lines(slurm_run):
    """tune and train keep the profile's `gpu: 1`: the plugin's sbatch line asks `--gpus=1` and
    the (fake) GPU is allocated; CPU-only rules ask for no GPU."""
    log = slurm_run["log"]
    calls = {m.group(1): m.group(0) for m in re.finditer(r"sbatch call: sbatch .*?--comment '?rule_([^\s']+).*", log)}
    train = next(c for rule, c in calls.items() if rule.startswith("train_wildcards_"))
    for flag in ("--gpus=1", f"-p {PARTITION}", "--export=ALL", "-t 480", "--cpus-per-gpu=1", "--mem ", " -D ",
                 "--requeue"):
        assert flag in train, (flag, train)
    assert "--cpus-per-task=" in calls[next(r for r in calls if r.startswith("preprocess_wildcards_"))]
    assert "--ntasks=" not in train  # the plugin leaves task geometry alone for GPU jobs
    for rule, call in calls.items():
        wants_gpu = rule.split("_wildcards_")[0] in ("tune", "train")
        assert ("--gpus=" in call) == wants_gpu, call
    gpu_jobs = 0
    work = slurm_run["work"]
    for jobid, job in squeue_jobs(slurm_run["run_id"]).items():
        rule, _, wildcards = job["comment"].removeprefix("rule_").partition("_wildcards_")
        wants_gpu = rule in ("tune", "train")
        # slurmctld's record of the request ...
        assert ("TresPerJob=gres:gpu:1" in sh("scontrol", "show", "job", jobid, "-o")) == wants_gpu
        # ... and what the job got: the in-job step logs its environment (--verbose) in the Slurm log
        slurm_log = (work / ".snakemake" / "slurm_logs" / f"rule_{rule}" / wildcards / f"{jobid}.log").read_text()
        assert f"'SLURM_JOB_ID': '{jobid}'" in slurm_log
        assert ("'SLURM_JOB_GPUS': '0'" in slurm_log and "'CUDA_VISIBLE_DEVICES': '0'" in slurm_log) == wants_gpu
        gpu_jobs += wants_gpu
    assert gpu_jobs == 2 * len(slurm_run["conf"]["projects"])


def test_mlflow_runs_carry_their_slurm_job_id(slurm_run):
    import mlflow

    work, conf = slurm_run["work"], slurm_run["conf"]
    jobs = squeue_jobs(slurm_run["run_id"])
    by_comment = {j["comment"]: jobid for jobid, j in jobs.items()}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'results/mlflow/mlflow.db'}")
    for name in conf["projects"]:
        exp = client.get_experiment_by_name(f"haven-{name}")
        runs = client.search_runs([exp.experiment_id])
        train = [r for r in runs if r.data.tags.get("haven.stage") == "train"]
        assert len(train) == 1
        assert train[0].data.tags.get("haven.slurm_job_id") == by_comment[f"rule_train_wildcards_{name}"]
        tune = [r for r in runs if r.data.tags.get("haven.stage") == "tune" and "mlflow.parentRunId" not in r.data.tags]
        assert tune and tune[0].data.tags.get("haven.slurm_job_id") == by_comment[f"rule_tune_wildcards_{name}"]
        assert "test_accuracy" in train[0].data.metrics


def test_outputs_are_complete_and_a_second_run_schedules_nothing(root, slurm_run):
    work, conf = slurm_run["work"], slurm_run["conf"]
    for name in conf["projects"]:
        res = work / "results" / name
        audit = json.loads((res / "anonymize" / "audit.json").read_text())
        assert audit["passed"] and audit["files"] > 0 and not audit["findings"]
        assert json.loads((res / "evaluate" / "metrics.json").read_text())["n"] > 0
        assert "data:image/png;base64" in (res / "report" / "index.html").read_text()
        assert (res / "train" / "model.pt").stat().st_size > 100_000
    # Slurm wrote a log per job (kept: --slurm-keep-successful-logs) under .snakemake/slurm_logs
    logs = list((work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert len(logs) == len(slurm_run["submitted"])
    again = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--profile",
                            str(root / "profiles" / "slurm"), "--configfile", str(work / "config.yaml"), "-n"],
                           cwd=work, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr


def test_profile_dry_run_without_slurm(root, tmp_path):
    """`snakemake --profile profiles/slurm -n` on a machine without Slurm (a laptop) plans the DAG."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for exe in Path(d).iterdir() if Path(d).is_dir() else []:
            if exe.name not in SLURM_PROGRAMS and not (fake / exe.name).exists():
                (fake / exe.name).symlink_to(exe)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(fake)])
    check = subprocess.run(["sh", "-c", "command -v sbatch sinfo squeue || true"], env=env, capture_output=True,
                           text=True)
    assert check.stdout.strip() == "", "Slurm still on PATH"
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--profile",
                          str(root / "profiles" / "slurm"), "--configfile", str(root / "config.yaml"), "-n"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    # one train job per project, or one per fold for a cross-validated project (the embedded config has both)
    from haven.config import cv_folds, load, trained_projects

    conf = load(root / "config.yaml")
    folds = [cv_folds(conf["projects"][p]) for p in trained_projects(conf)]
    assert "This was a dry-run" in out, out[-3000:]
    assert re.search(rf"^train\s+{sum(1 for f in folds if not f)}$", out, re.M), out[-3000:]
    assert re.search(rf"^train_fold\s+{sum(folds)}$", out, re.M) and sum(folds), out[-3000:]


def test_data_stages_equal_a_local_run(root, slurm_run):
    """The Slurm run's de-identified data, splits and shards are byte for byte what a local run of
    the same config makes (the stages are deterministic: keyed UIDs, seeded splits)."""
    import hashlib

    import zarr

    work = slurm_run["work"]
    local = work.parent / (work.name + "-local")
    local.mkdir(exist_ok=True)
    shutil.copy(work / "config.yaml", local / "config.yaml")
    if (work / ".secrets").is_dir():  # the same key, as a site would use
        shutil.copytree(work / ".secrets", local / ".secrets", dirs_exist_ok=True)
    name = next(iter(slurm_run["conf"]["projects"]))
    target = f"results/{name}/preprocess/stats.json"
    run = subprocess.run([sys.executable, "-m", "snakemake", target, "-s", str(root / "Snakefile"), "--profile",
                          str(root / "profiles" / "local"), "--configfile", str(local / "config.yaml")],
                         cwd=local, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    def digest(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    a, b = work / "results" / name, local / "results" / name
    anon = digest(a / "anonymize" / "data")
    assert anon and anon == digest(b / "anonymize" / "data")
    for f in ("anonymize/manifest.csv", "anonymize/anonymization.log.csv", "preprocess/splits.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for split in ("train", "val", "test"):
        x, y = (zarr.open_group(d / "preprocess" / f"{split}.zarr", mode="r") for d in (a, b))
        assert (x["images"][:] == y["images"][:]).all() and (x["labels"][:] == y["labels"][:]).all()


def test_profile_installed_by_name(root, tmp_path):
    """`haven profile install` puts the profiles where Snakemake looks up `--profile slurm`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), HAVEN_SLURM_PARTITION="gpu-by-site")
    inst = subprocess.run([str(Path(sys.executable).parent / "haven"), "profile", "install"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert inst.returncode == 0, inst.stderr
    installed = tmp_path / "config" / "snakemake" / "slurm" / "config.yaml"
    assert installed.read_bytes() == (root / "profiles" / "slurm" / "config.yaml").read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--profile", "slurm",
                          "--configfile", str(root / "config.yaml"), "-n"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    # the profile's GPU request and the site's partition are both in the plan
    assert re.search(r"rule train:(?:\n.*){0,12}resources: .*slurm_partition=gpu-by-site.*gpu=1", out), out[-3000:]
    again = subprocess.run([str(Path(sys.executable).parent / "haven"), "profile", "install"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0  # unchanged: nothing to refuse
    installed.write_text(installed.read_text() + "jobs: 3\n")
    refused = subprocess.run([str(Path(sys.executable).parent / "haven"), "profile", "install"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--force" in refused.stderr and "jobs: 3" in installed.read_text()


def test_preprocess_with_dask_workers_as_slurm_jobs(slurm_cluster, tmp_path):
    """preprocess.dask.cluster: slurm — the Dask workers are Slurm jobs (dask-jobqueue SLURMCluster)
    and write the same shards as a local cluster."""
    import numpy as np
    import pandas as pd
    import zarr
    from PIL import Image

    from haven.learn.preprocess import preprocess

    anon = tmp_path / "anon"
    (anon / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for p in range(16):
        for i in range(2):
            name = f"{p}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (20, 20)).astype(np.uint8)).save(anon / "data" / name)
            rows.append({"file": name, "kind": "image", "patient": f"P{p}", "study": "", "series": "",
                         "label": "ab"[p % 2], "sex": "", "age_band": "", "site": "", "modality": ""})
    pd.DataFrame(rows).to_csv(anon / "manifest.csv", index=False)
    (anon / "audit.json").write_text(json.dumps({"passed": True}))
    base = {"size": 16, "mode": "gray", "windows": [], "split": {"val": 0.2, "test": 0.2}, "chunk": 4, "workers": 1}
    seen = []

    def watch():  # the worker job, while it lives
        while not seen or seen[-1] != "done":
            out = subprocess.run(["squeue", "--noheader", "--name", "haven-dask", "--format=%i|%T|%P"],
                                 capture_output=True, text=True).stdout.split()
            seen.extend(out)
            time.sleep(0.5)
            if len(seen) > 2000:
                break

    import threading

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    dask = {"cluster": "slurm", "jobs": 1, "cores": 1, "memory": "2GB", "walltime": "00:10:00",
            "queue": slurm_cluster["partition"], "scheduler_host": "127.0.0.1", "timeout": 180,
            "log_directory": str(tmp_path / "dask-logs")}
    on_slurm = preprocess(anon, tmp_path / "slurm", {**base, "dask": dask}, seed=0)
    seen.append("done")
    t.join(timeout=10)
    local = preprocess(anon, tmp_path / "local", base, seed=0)
    assert on_slurm["samples"] == local["samples"]
    for split in ("train", "val", "test"):
        a, b = (zarr.open_group(tmp_path / d / f"{split}.zarr", mode="r") for d in ("slurm", "local"))
        assert (a["images"][:] == b["images"][:]).all()
    running = [s for s in seen if "|RUNNING|" in s]
    assert running and all(s.endswith(f"|{slurm_cluster['partition']}") for s in running), seen[:10]
