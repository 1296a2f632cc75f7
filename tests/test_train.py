import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

from haven.config import section_defaults
from haven.learn.data import ZarrSplit
from haven.learn.train import fit, warmup_cosine

MODEL = {"backbone": "resnet18", "weights": None}
TRAIN = {"epochs": 3, "freeze_epochs": 1, "unfreeze": "all", "batch_size": 16, "lr": 0.01,
         "backbone_lr_factor": 0.1, "weight_decay": 1e-4, "label_smoothing": 0.0, "warmup_epochs": 0.5,
         "patience": 5, "threads": 1}


def _split(path, n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 1, 16, 16)).astype(np.uint8)
    images[labels == 1, :, 4:12, 4:12] += 150  # a learnable bright square
    g = zarr.open_group(path, mode="w")
    g.create_array("images", data=images, chunks=(8, 1, 16, 16))
    g.create_array("labels", data=labels.astype(np.int64), chunks=(n,))
    g.attrs.update({"classes": ["empty", "square"], "mean": [0.2], "std": [0.25]})
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("zarr")
    return _split(d / "train.zarr", 64, 0), _split(d / "val.zarr", 32, 1)


def test_loader_reads_every_sample_once_per_epoch(data):
    split = ZarrSplit(data[0])
    seen = np.concatenate([y.numpy() for _, y in split.batches(10, shuffle=True, rng=np.random.default_rng(0))])
    assert len(seen) == 64 and seen.sum() == 32


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_resume_after_interruption_gives_the_same_weights(data, tmp_path):
    train, val = data
    full = fit(train, val, MODEL, TRAIN, tmp_path / "full", seed=3)
    assert full.history[0]["frozen"] == 1 and full.history[1]["frozen"] == 0

    class Killed(Exception):
        pass

    def kill_after_epoch_1(metrics):
        if metrics["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(train, val, MODEL, TRAIN, tmp_path / "cut", seed=3, report=kill_after_epoch_1)
    assert (tmp_path / "cut" / "checkpoints" / "last.pt").is_file()
    resumed = fit(train, val, MODEL, TRAIN, tmp_path / "cut", seed=3)
    assert resumed.resumed_from == 2
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history])
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # and it learns (the pretrained-weights case is asserted by the pipeline test)
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]


def test_checkpoint_of_other_hyperparameters_is_not_resumed(data, tmp_path):
    train, val = data
    fit(train, val, MODEL, dict(TRAIN, epochs=1), tmp_path, seed=0)
    other = fit(train, val, MODEL, dict(TRAIN, epochs=1, lr=0.001), tmp_path, seed=0)
    assert other.resumed_from == 0


def test_augment_is_per_sample_and_off_at_strength_zero():
    from haven.learn.data import augment

    off = section_defaults("train", "augment")  # every magnitude 0
    x = torch.zeros(64, 1, 8, 8)
    x[..., :4] = 1.0  # left half bright
    flipped = augment(x, {**off, "hflip": True}, 1.0, torch.Generator().manual_seed(0))
    left = flipped[..., :4].mean(dim=(1, 2, 3))
    assert 10 < int((left < 0.5).sum()) < 54  # some samples flipped, some not
    assert torch.equal(augment(x, {**off, "hflip": True, "rotate": 30}, 0.0), x)
    again = augment(x, {**off, "hflip": True}, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, again)


def test_balanced_sampler_evens_out_rare_classes(tmp_path):
    n = 200
    labels = (np.arange(n) % 10 == 0).astype(np.int64)  # 10 % positives
    g = zarr.open_group(tmp_path / "imb.zarr", mode="w")
    g.create_array("images", data=np.zeros((n, 1, 4, 4), np.uint8), chunks=(20, 1, 4, 4))
    g.create_array("labels", data=labels, chunks=(n,))
    g.attrs.update({"classes": ["neg", "pos"]})
    split = ZarrSplit(tmp_path / "imb.zarr")
    ys = np.concatenate([y.numpy() for _, y in split.batches(32, True, np.random.default_rng(0), balanced=True)])
    assert len(ys) == n and 0.35 < ys.mean() < 0.65


def test_data_parallel_ranks_share_the_epoch_and_stay_in_sync(data, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank reads its own chunks, together one epoch;
    DDP keeps the replicas identical; rank 0 alone writes checkpoints."""
    train, val = data
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import hashlib, json, os, sys
        import torch
        from haven.learn.train import fit
        r = fit({str(train)!r}, {str(val)!r}, {MODEL!r}, {TRAIN!r}, {str(tmp_path / "work")!r}, seed=3)
        digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in r.model.state_dict().values())).hexdigest()
        rank = os.environ["RANK"]
        open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w").write(json.dumps({{"digest": digest, "history": r.history}}))
    """))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["digest"] == r1["digest"]  # the replicas are the same model
    assert [h["samples"] for h in r0["history"]] == [64] * TRAIN["epochs"] and r1["history"] == []
    assert r0["history"][-1]["train_loss"] < r0["history"][0]["train_loss"]
    assert (tmp_path / "work" / "checkpoints" / "last.pt").is_file()


def test_train_command_launches_torchrun_for_several_processes(data, tmp_path):
    train, val = data
    (tmp_path / "stats.json").write_text("{}")
    out = tmp_path / "out"
    params = json.dumps({"model": MODEL, "train": dict(TRAIN, epochs=2), "seed": 3})
    run = subprocess.run([sys.executable, "-m", "haven.cli", "train", "--train", str(train), "--val", str(val),
                          "--stats", str(tmp_path / "stats.json"), "--model", str(out / "model.pt"),
                          "--history", str(out / "history.csv"), "--summary", str(out / "run.json"), "--nproc", "2",
                          "--params", params], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2
    assert (tmp_path / "out" / "model.pt").stat().st_size > 1000
