"""Tune stage: search space, resources, the multi-node launcher, a real ASHA + Optuna search on a
small synthetic dataset (single-node Ray), and resuming a search that was killed mid-trial."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from haven import config as cfg
from haven.learn import launch as L
from haven.learn import tune as T


# ---------------------------------------------------------------------------------------------
# pure functions
def test_search_space_maps_every_type():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = T.search_space({
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
        "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
        "unfreeze": {"type": "randint", "low": 1, "high": 3},
        "backbone": {"type": "choice", "values": ["efficientnet_lite0", "tf_efficientnet_lite0"]},
    })
    assert isinstance(space["lr"], Float) and isinstance(space["weight_decay"], Float)
    assert isinstance(space["unfreeze"], Integer) and isinstance(space["backbone"], Categorical)
    draws = space["unfreeze"].sample(size=300, random_state=np.random.default_rng(0))
    assert set(draws) == {1, 2, 3}  # randint includes both ends
    lrs = np.asarray(space["lr"].sample(size=300, random_state=np.random.default_rng(0)))
    assert lrs.min() >= 1e-4 and lrs.max() <= 1e-1 and np.median(lrs) < 0.01  # log-scale


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": {"type": "uniform", "low": 0, "high": 1}}, "not a tunable"),
    ({"lr": {"type": "loguniform", "low": 0.0, "high": 1}}, "low` > 0"),
    ({"lr": {"type": "uniform", "low": 1, "high": 1}}, "low` < `high"),
    ({"batch_size": {"type": "choice", "values": []}}, "non-empty"),
])
def test_search_space_rejects_what_cannot_be_searched(space, message):
    with pytest.raises(ValueError, match=message):
        T.search_space(space)


def test_schema_validates_the_search_space(root):
    conf = yaml.safe_load((root / "config.yaml").read_text())
    space = conf["projects"]["digits"]["tune"]["search_space"]
    space["weight_decay"] = {"type": "loguniform", "low": 1e-6, "high": 1e-2}
    space["freeze_epochs"] = {"type": "randint", "low": 0, "high": 2}
    space["backbone"] = {"type": "choice", "values": ["efficientnet_lite0", "tf_efficientnet_lite0"]}
    cfg.validate(conf)  # every documented key and type is accepted
    space["momentum"] = {"type": "uniform", "low": 0.8, "high": 0.99}
    space["lr"] = {"type": "loguniform", "low": 0, "high": 0.1}
    space["batch_size"] = {"type": "choice"}
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate(conf)
    msg = str(err.value)
    assert "'momentum' is not one of" in msg
    assert "projects.digits.tune.search_space.lr.low" in msg
    assert "projects.digits.tune.search_space.batch_size: 'values' is a required property" in msg


def test_ray_gets_exactly_the_allocated_cpus_and_gpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert L.allocated_cpus() == 6
    assert L.allocated_cpus(requested=4) == 4  # the rule's threads (Snakemake may scale them down)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert L.allocated_cpus() == 16 and L.allocated_cpus(32) == 16
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert L.allocated_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert L.allocated_gpus() == 0


def test_trials_that_cannot_fit_fail_fast():
    tune_cfg = {"cpus_per_trial": 1, "gpus_per_trial": 0.25}
    T.check_resources(tune_cfg, {"CPU": 2, "GPU": 1})
    with pytest.raises(ValueError, match="gpus_per_trial"):
        T.check_resources(tune_cfg, {"CPU": 2})
    with pytest.raises(ValueError, match="cpus_per_trial"):
        T.check_resources({"cpus_per_trial": 4, "gpus_per_trial": 0}, {"CPU": 2})


def test_multinode_slurm_job_starts_ray_on_every_node():
    argv = ["tune", "--train", "results/x/preprocess/train.zarr", "--best", "results/x/tune/best_config.yaml",
            "--cpus", "8", "--rule", "tune", "--params", "{}"]
    single = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1"}
    assert L.slurm_multinode_command(argv, single) is None
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[01-03]",
           "SLURM_CPUS_PER_TASK": "8"}
    cmd = L.slurm_multinode_command(argv, env, port=6500)
    assert cmd[:5] == ["srun", "--overlap", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1"]
    assert "--nodelist=gpu[01-03]" in cmd and "--cpus-per-task=8" in cmd
    i = cmd.index("symmetric-run")
    assert cmd[i - 1] == "ray" and cmd[i + 1] == "--address" and cmd[i + 2].endswith(":6500")
    assert cmd[cmd.index("--min-nodes") + 1] == "3" and "--num-cpus=8" in cmd
    entry = cmd[cmd.index("--") + 1:]
    assert entry[:2] == ["env", "HAVEN_RAY_CLUSTER=1"] and entry[3:5] == ["-m", "haven.cli"]
    assert entry[5:5 + len(argv)] == argv and entry[-2:] == ["--ray-address", cmd[i + 2]]
    # inside the Ray cluster the command does not relaunch itself
    assert L.slurm_multinode_command(argv, {**env, "HAVEN_RAY_CLUSTER": "1"}) is None


def test_search_identity_ignores_where_it_runs():
    base = {"num_samples": 4, "max_epochs": 3, "search": "optuna", "cpus": 2, "gpus_per_trial": 0,
            "search_space": {"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}}
    a = T.search_name({}, {}, base, 1, "d1")
    assert a == T.search_name({}, {}, {**base, "cpus": 16, "gpus_per_trial": 0.5, "nodes": 2}, 1, "d1")
    assert a != T.search_name({}, {}, {**base, "num_samples": 5}, 1, "d1")
    assert a != T.search_name({}, {}, base, 2, "d1")
    assert a != T.search_name({}, {}, base, 1, "d2")  # other data: a new search


# ---------------------------------------------------------------------------------------------
# real searches (Ray, single node)
def _split(path, n, seed, size=16):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 1, size, size)).astype(np.uint8)
    images[labels == 1, :, 4:12, 4:12] += 150  # a learnable bright square
    g = zarr.open_group(path, mode="w")
    g.create_array("images", data=images, chunks=(32, 1, size, size))
    g.create_array("labels", data=labels.astype(np.int64), chunks=(n,))
    g.attrs.update({"classes": ["empty", "square"], "mean": [0.2], "std": [0.25]})


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """A preprocess folder as the stage writes it (Zarr splits, stats.json, splits.csv)."""
    d = tmp_path_factory.mktemp("proj") / "results" / "toy" / "preprocess"
    d.mkdir(parents=True)
    _split(d / "train.zarr", 256, 0)
    _split(d / "val.zarr", 64, 1)
    rows = [{"file": f"I{i:04d}.png", "patient": f"P{i:04d}", "label": ["empty", "square"][i % 2],
             "split": "train" if i < 256 else "val"} for i in range(320)]
    pd.DataFrame(rows).to_csv(d / "splits.csv", index=False)
    (d / "stats.json").write_text(json.dumps({"classes": ["empty", "square"], "data_manifest_hash": "feedc0ffee"}))
    return d


def _config(tmp_path, pre, **tune):
    conf = {"results": str(tmp_path / "results"), "seed": 3, "projects": {"toy": {
        "source": str(pre),
        "model": {"backbone": "resnet10t", "weights": None},
        "train": {"epochs": 2, "freeze_epochs": 0, "batch_size": 32, "threads": 1, "warmup_epochs": 0},
        "tune": {"num_samples": 4, "max_epochs": 3, "grace_period": 1, "reduction_factor": 2, "cpus": 2,
                 "search_space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 0.05},
                                  "batch_size": {"type": "choice", "values": [16, 32]},
                                  "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.01}},
                 **tune}}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def _files(pre, out):
    """The tune command's data and output files, as the rule passes them."""
    return ["--train", pre / "train.zarr", "--val", pre / "val.zarr", "--stats", pre / "stats.json",
            "--splits", pre / "splits.csv", "--best", out / "best_config.yaml", "--trials", out / "trials.csv",
            "--history", out / "history.csv", "--plot", out / "search.png"]


def _haven(*args, **kw):
    return subprocess.run([sys.executable, "-m", "haven.cli", *map(str, args)], **kw)


@pytest.mark.integration
def test_asha_optuna_search_writes_best_config_trials_plot_and_mlflow_runs(tmp_path, pre):
    import mlflow

    conf = _config(tmp_path, pre)
    out = tmp_path / "tune"
    run = _haven("tune", *_files(pre, out), "--config", conf, "--project", "toy", "--rule", "tune", "--cpus", "2",
                 capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["scheduler"] == "asha" and best["search"] == "optuna" and best["trials"] == 4
    assert set(best["config"]) == {"lr", "batch_size", "weight_decay"}
    assert 1e-4 <= best["config"]["lr"] <= 0.05 and best["config"]["batch_size"] in (16, 32)
    assert 0.0 <= best["value"] <= 1.0 and 1 <= best["best_epoch"] <= 3
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "TERMINATED").all()
    assert {"param_lr", "param_batch_size", "param_weight_decay", "training_iteration", "val_balanced_accuracy",
            "best_val_balanced_accuracy", "stopped_early"} <= set(trials.columns)
    history = pd.read_csv(out / "history.csv")
    assert len(history) == trials["training_iteration"].sum() == best["trial_epochs"] <= 4 * 3
    assert list(history["trial_epochs"]) == list(range(1, len(history) + 1))
    assert history.groupby("trial_id")["training_iteration"].max().to_dict() == dict(
        zip(trials["trial_id"], trials["training_iteration"]))
    assert (out / "search.png").stat().st_size > 5000
    # a finished search keeps no model checkpoints (they are only for resuming), and the
    # trainer's own files never land in the storage
    assert not list((out / "ray").rglob("*.pt"))

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results/mlflow/mlflow.db'}")
    exp = client.get_experiment_by_name("haven-toy")
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(best["mlflow_run_id"])
    assert parent.data.tags["haven.stage"] == "tune" and parent.data.tags["haven.snakemake_rule"] == "tune"
    assert parent.data.tags["haven.snakemake_wildcards"] == "project=toy"
    assert parent.data.tags["haven.data_manifest_hash"] == "feedc0ffee"
    assert parent.data.metrics["trial_epochs"] == best["trial_epochs"]
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"toy-train", "toy-val"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert {c.data.tags["haven.trial_id"] for c in children} == set(trials["trial_id"])
    assert all("lr" in c.data.params and "val_balanced_accuracy" in c.data.metrics for c in children)


@pytest.mark.integration
def test_killed_search_resumes_its_trials_from_their_checkpoints(tmp_path, pre):
    """kill -9 the whole tune job once a trial has checkpointed; the re-run restores the search
    (Tuner.restore) and continues the cut trials after their last epoch instead of starting over."""
    conf = _config(tmp_path, pre, num_samples=2, max_epochs=4, scheduler="fifo", search="random",
                   cpus_per_trial=1, max_concurrent_trials=1, keep_checkpoints=True)
    out = tmp_path / "tune"
    args = ["tune", *_files(pre, out), "--config", conf, "--project", "toy", "--cpus", "2"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        first = subprocess.Popen([sys.executable, "-m", "haven.cli", *map(str, args)], stdout=fh, stderr=fh,
                                 env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if re.search(r"trial \w+ epoch [12]:", log.read_text()):
                break
            time.sleep(0.2)
        assert first.poll() is None, "the search ended before it could be interrupted:\n" + log.read_text()[-3000:]
        time.sleep(1.0)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (out / "best_config.yaml").exists()
    assert list((out / "ray").rglob("checkpoint_*")), "no trial checkpoint reached the storage"

    second = _haven(*args, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming the interrupted search" in second.stderr
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["resumed"] is True and best["trials"] == 2
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials["training_iteration"] == 4).all()
    assert trials["resumed_after_epoch"].max() >= 1  # continued from a checkpoint, not from scratch
    history = pd.read_csv(out / "history.csv")
    assert sorted(history.groupby("trial_id")["training_iteration"].apply(list).tolist()) == [[1, 2, 3, 4]] * 2
    # the killed attempt's scratch (kill -9 skips its clean-up) went when its trial resumed
    scratch = Path(tempfile.gettempdir())
    assert not [p for t in trials["trial_id"] for p in scratch.glob(f"haven-trial-{t}-*")]
