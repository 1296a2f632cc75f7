"""MLflow tracking: lineage tags, datasets, the model registry and `haven compare` on an embedded
store, then the whole pipeline against a real `mlflow server` (sqlite backend, local artifact
root) started on 127.0.0.1, read back through the MLflow client."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from haven import config as cfg
from haven import track as trk


def test_lineage_tags_name_code_config_data_rule_and_host(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("HAVEN_RULE", "train")
    monkeypatch.setenv("HAVEN_WILDCARDS", "project=digits")
    tags = trk.lineage_tags("train", "digits", "c0nf", "da7a")
    assert tags["haven.stage"] == "train" and tags["haven.project"] == "digits"
    assert tags["haven.config_hash"] == "c0nf" and tags["haven.data_manifest_hash"] == "da7a"
    assert tags["haven.slurm_job_id"] == "4242" and tags["haven.snakemake_rule"] == "train"
    assert tags["haven.snakemake_wildcards"] == "project=digits" and tags["haven.host"] == socket.gethostname()
    commit = tags["haven.git_commit"]
    assert commit == "unknown" or len(commit) == 40  # haven's own checkout, whatever the cwd
    assert tags["haven.git_dirty"] in ("True", "False", "unknown")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert "haven.slurm_job_id" not in trk.lineage_tags("tune", "digits")


def test_remote_uris_are_recognised():
    assert trk.is_remote("http://127.0.0.1:5000") and trk.is_remote("https://mlflow.example.org")
    assert not trk.is_remote(None) and not trk.is_remote("sqlite:///x/mlflow.db")
    assert trk.default_uri("results").startswith("sqlite:///") and trk.default_uri("results").endswith(
        "results/mlflow/mlflow.db")


# ---------------------------------------------------------------------------------------------
def _split(path, n, seed, size=16):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 1, size, size)).astype(np.uint8)
    images[labels == 1, :, 4:12, 4:12] += 150
    g = zarr.open_group(path, mode="w")
    g.create_array("images", data=images, chunks=(32, 1, size, size))
    g.create_array("labels", data=labels.astype(np.int64), chunks=(n,))
    # what preprocess records and model.pt carries on: the settings that made the samples
    pixels = {"size": size, "mode": "gray", "windows": [{"center": 40, "width": 80}], "slab": 0}
    g.attrs.update({"classes": ["empty", "square"], "mean": [0.2], "std": [0.25], "pixels": pixels})


def _project(results: Path, name: str, tracking: dict, lr: float) -> Path:
    """A project's results folder as the stages leave it: preprocess, train (+ MLflow run),
    evaluate (into the train run) and a report page."""
    from haven.learn.tasks import get_task
    from haven.learn.train import TrainFiles, train

    proj = results / name
    pre = proj / "preprocess"
    pre.mkdir(parents=True)
    for split, n, seed in (("train", 96, 0), ("val", 32, 1), ("test", 32, 2)):
        _split(pre / f"{split}.zarr", n, seed)
    pd.DataFrame([{"file": f"I{i}.png", "patient": f"P{i}", "label": ["empty", "square"][i % 2],
                   "split": "train" if i < 96 else "val" if i < 128 else "test"} for i in range(160)]
                 ).to_csv(pre / "splits.csv", index=False)
    (pre / "stats.json").write_text(json.dumps({"classes": ["empty", "square"], "data_manifest_hash": "da7a"}))
    tr = {"epochs": 1, "freeze_epochs": 0, "unfreeze": "all", "batch_size": 32, "lr": lr, "backbone_lr_factor": 1.0,
          "weight_decay": 0.0, "label_smoothing": 0.0, "warmup_epochs": 0, "patience": 3, "threads": 1}
    out = proj / "train"
    files = TrainFiles(train=pre / "train.zarr", val=pre / "val.zarr", stats=pre / "stats.json", model=out / "model.pt",
                       history=out / "history.csv", run=out / "run.json", workdir=out, splits=pre / "splits.csv")
    run = train(files, {"backbone": "resnet10t", "weights": None}, tr, task=get_task("classification"), seed=0,
                tracking={**tracking, "project": name, "experiment": f"haven-{name}", "data_hash": "da7a",
                          "tune_run_id": "tune-of-" + name})
    # what the evaluate stage leaves: metrics.json, and the test metrics in the train run
    import mlflow

    from haven.learn.checkpoint import load_model
    from haven.learn.data import ZarrSplit
    from haven.learn.infer import predict

    model, _ = load_model(proj / "train" / "model.pt")
    probs, y = predict(model, ZarrSplit(pre / "test.zarr"), get_task("classification"), "bf16")
    acc = float((probs.argmax(1) == y).mean())
    (proj / "evaluate").mkdir()
    (proj / "evaluate" / "metrics.json").write_text(json.dumps(
        {"n": len(y), "accuracy": acc, "balanced_accuracy": acc, "roc_auc": 0.5, "classes": ["empty", "square"]}))
    with trk.session({**tracking, "experiment": f"haven-{name}"}), mlflow.start_run(run_id=run["mlflow_run_id"]):
        mlflow.log_metrics({"test_accuracy": acc, "test_balanced_accuracy": acc, "test_roc_auc": 0.5})
    (proj / "report").mkdir()
    (proj / "report" / "index.html").write_text(f"<html><h1>{name}</h1></html>")
    return proj


def _register(files, tracking, name):
    """The register stage's call: the model as haven's pyfunc package (files in, preprocessing inside)."""
    from haven.predict.pyfunc import log_package

    return trk.register_model(files, tracking, name, log_model=log_package)


def test_registry_versions_carry_metrics_and_report_and_compare_lists_projects(tmp_path):
    import mlflow

    results = tmp_path / "results"
    base = {"results": str(results), "uri": None, "config_hash": "c0nf"}
    a = _project(results, "toy-a", base, lr=0.01)
    b = _project(results, "toy-b", base, lr=0.001)
    client = mlflow.MlflowClient(tracking_uri=trk.default_uri(results))

    # the train run has the audited splits as its inputs
    train_run = client.get_run(json.loads((a / "train" / "run.json").read_text())["mlflow_run_id"])
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
              for d in train_run.inputs.dataset_inputs}
    assert inputs == {("toy-a-train", "training"), ("toy-a-val", "validation")}

    # the ONNX export beside the model (haven export-onnx): register logs it to the train run
    from haven.predict.onnx import export_and_check

    record = export_and_check(a / "train" / "model.pt", a / "preprocess" / "test.zarr", a / "train" / "model.onnx")
    (a / "train" / "onnx.json").write_text(json.dumps(record))
    first = _register(trk.RegisterFiles.in_results(a), {**base, "project": "toy-a", "experiment": "haven-toy-a"}, "haven-toy-a")
    assert {"onnx/model.onnx", "onnx/onnx.json"} <= {f.path for f in client.list_artifacts(train_run.info.run_id, "onnx")}
    assert first["version"] == 1 and first["champion_version"] == 1
    version = client.get_model_version("haven-toy-a", "1")
    evaluated = json.loads((a / "evaluate" / "metrics.json").read_text())
    assert float(version.tags["test_accuracy"]) == pytest.approx(evaluated["accuracy"], abs=1e-5)
    assert version.tags["report"] == (a / "report" / "index.html").resolve().as_uri()
    assert version.tags["haven.train_run_id"] == train_run.info.run_id
    assert version.tags["haven.tune_run_id"] == "tune-of-toy-a"
    assert version.run_id == train_run.info.run_id and "index.html" in version.description
    assert int(client.get_model_version_by_alias("haven-toy-a", "champion").version) == 1
    # the report stage (after register) logs its page to the train run the version links to
    trk.log_report({**base, "project": "toy-a", "experiment": "haven-toy-a"}, a / "train" / "run.json",
                   [a / "report" / "index.html"])
    assert "report/index.html" in [f.path for f in client.list_artifacts(train_run.info.run_id, "report")]
    # a loadable model that takes files (the pyfunc package), not just a file
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(png, format="PNG")
    model = mlflow.pyfunc.load_model("models:/haven-toy-a@champion")
    answer = model.predict(pd.DataFrame({"data": [base64.b64encode(png.getvalue()).decode()]}))
    assert answer.loc[0, "predicted"] in ("empty", "square")
    assert answer.loc[0, ["p_empty", "p_square"]].sum() == pytest.approx(1.0, abs=1e-5)

    # a worse later version does not take the alias; a better one does
    metrics = a / "evaluate" / "metrics.json"
    worse = {**evaluated, "balanced_accuracy": -1.0}
    metrics.write_text(json.dumps(worse))
    assert _register(trk.RegisterFiles.in_results(a), {**base, "project": "toy-a", "experiment": "haven-toy-a"},
                              "haven-toy-a")["champion_version"] == 1
    metrics.write_text(json.dumps({**evaluated, "balanced_accuracy": 2.0}))
    assert _register(trk.RegisterFiles.in_results(a), {**base, "project": "toy-a", "experiment": "haven-toy-a"},
                              "haven-toy-a")["champion_version"] == 3
    _register(trk.RegisterFiles.in_results(b), {**base, "project": "toy-b", "experiment": "haven-toy-b"}, "haven-toy-b")

    table = trk.compare({"toy-a": "haven-toy-a", "toy-b": "haven-toy-b", "none": "haven-none"}, results)
    assert list(table["project"]) == ["toy-a", "toy-b", "none"]
    row = table.set_index("project").loc["toy-a"]
    assert row["run_id"] == train_run.info.run_id and row["model_version"] == 3
    assert row["test_accuracy"] == pytest.approx(evaluated["accuracy"])
    assert row["lr"] == "0.01" and row["backbone"] == "resnet10t" and row["data_manifest_hash"] == "da7a"
    assert table.set_index("project").loc["toy-b", "lr"] == "0.001"
    text = trk.format_comparison(table)
    assert "toy-a" in text.splitlines()[0] and "test_accuracy" in text


# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server: sqlite backend, artifacts proxied to a local folder."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (d / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url, d
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.mark.integration
def test_pipeline_against_a_real_tracking_server(root, tmp_path, mlflow_server):
    """tune → train → evaluate → report → register → compare for one small project, every run,
    artifact and model version sent to the server; read back through the MLflow client."""
    import mlflow

    url, server_dir = mlflow_server
    conf = yaml.safe_load((root / "config.yaml").read_text())
    digits = conf["projects"]["digits"]  # small and fast: this test is about tracking, not accuracy
    digits["preprocess"]["size"] = 16
    digits["model"] = {"backbone": "resnet10t", "weights": None}
    digits["train"].update(epochs=1, freeze_epochs=0)
    digits["tune"].update(num_samples=3, max_epochs=2, search_space={
        "lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2}, "batch_size": {"type": "choice", "values": [64, 128]}})
    # the cheapest evaluate the schema allows (only the keys it knows)
    known = cfg.schema()["$defs"]["project"]["properties"]["evaluate"]["properties"]
    cheap = {"bootstrap": 0, "explain_per_class": 1, "randomization_samples": 1, "attack_samples": 8,
             "epsilons": [0.0, 0.03], "pgd_steps": 1}
    digits["evaluate"] = {k: v for k, v in cheap.items() if k in known}
    conf["projects"] = {"digits": digits}
    conf["tracking_uri"] = url
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(conf))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "--cores", "2"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - t0
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in (tmp_path / "results").rglob("logs/*.log"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:] + logs
    print(f"pipeline against {url}: {wall:.0f} s")

    results = tmp_path / "results"
    assert not (results / "mlflow").exists()  # nothing went to an embedded store
    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.get_experiment_by_name("haven-digits")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("haven.stage"), []).append(r)
    best = yaml.safe_load((results / "digits/tune/best_config.yaml").read_text())
    tune = client.get_run(best["mlflow_run_id"])
    children = [r for r in by_stage["tune"] if r.data.tags.get("mlflow.parentRunId") == tune.info.run_id]
    assert len(children) == 3 and len(by_stage["tune"]) == 4
    (train,) = by_stage["train"]
    assert train.data.tags["haven.tune_run_id"] == tune.info.run_id
    for r in (tune, train, *children):
        for tag in ("haven.config_hash", "haven.data_manifest_hash", "haven.git_commit", "haven.git_dirty",
                    "haven.host", "haven.snakemake_rule", "haven.snakemake_wildcards"):
            assert r.data.tags.get(tag), (r.info.run_name, tag)
    assert train.data.tags["haven.snakemake_rule"] == "train"
    assert train.data.tags["haven.snakemake_wildcards"] == "project=digits"
    stats = json.loads((results / "digits/preprocess/stats.json").read_text())
    assert train.data.tags["haven.data_manifest_hash"] == stats["data_manifest_hash"]
    assert {d.dataset.name for d in train.inputs.dataset_inputs} == {"digits-train", "digits-val"}
    evaluated = json.loads((results / "digits/evaluate/metrics.json").read_text())
    assert train.data.metrics["test_accuracy"] == pytest.approx(evaluated["accuracy"])
    # artifacts went through the server into its artifact root
    assert {"history.csv", "model", "evaluate", "report"} <= {f.path for f in client.list_artifacts(train.info.run_id)}
    stored = {p.name for p in (server_dir / "artifacts").rglob("*")}
    assert {"history.csv", "search.png", "trials.csv", "index.html", "MLmodel"} <= stored

    registered = json.loads((results / "digits/track/registered.json").read_text())
    assert registered["name"] == "haven-digits" and registered["tracking_uri"] == url
    version = client.get_model_version("haven-digits", str(registered["version"]))
    assert version.run_id == train.info.run_id
    assert float(version.tags["test_balanced_accuracy"]) == pytest.approx(evaluated["balanced_accuracy"], abs=1e-5)
    assert version.tags["report"].endswith("results/digits/report/index.html")
    assert client.get_model_version_by_alias("haven-digits", "champion").version == version.version

    table = pd.read_csv(results / "compare.csv")
    assert list(table["project"]) == ["digits"]
    assert table.loc[0, "run_id"] == train.info.run_id and table.loc[0, "model_version"] == version_number(version)
    assert table.loc[0, "test_accuracy"] == pytest.approx(evaluated["accuracy"])

    again = subprocess.run([*cmd, "-n"], capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout + again.stderr


def version_number(version) -> int:
    return int(version.version)
