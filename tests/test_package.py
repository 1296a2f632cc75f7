"""The model packages: the ONNX export with onnxruntime parity on a test split, the MLflow pyfunc
(files in, the training run's preprocessing inside) logged to a real local store and loaded back,
and `mlflow models serve` answering a real HTTP request on loopback with a DICOM file."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundles import ct_bundle, ct_files, gray_bundle, gray_files  # noqa: E402

import haven  # noqa: E402
from haven.predict.bundle import Bundle  # noqa: E402


def _test_split(path: Path, model_pt: Path, n: int = 20, seed: int = 0) -> Path:
    """A test split in the preprocess stage's format (haven.learn.data.ZarrSplit) for the model."""
    import torch

    meta = torch.load(model_pt, weights_only=False)
    c, s = int(meta["in_chans"]), int(meta["size"])
    rng = np.random.default_rng(seed)
    g = zarr.open_group(path, mode="w")
    g.create_array("images", data=rng.integers(0, 256, (n, c, s, s)).astype(np.uint8), chunks=(8, c, s, s))
    g.create_array("labels", data=(np.arange(n) % len(meta["classes"])).astype(np.int64), chunks=(n,))
    g.attrs.update({"classes": list(meta["classes"]), "mean": meta["mean"], "std": meta["std"]})
    return path


@pytest.mark.parametrize("make", [ct_bundle, gray_bundle], ids=["ct-3ch", "gray-10class"])
def test_onnx_export_matches_torch_on_the_test_split(tmp_path, make):
    import onnxruntime as ort

    from haven.cli import main

    model_pt, _ = make(tmp_path)
    test = _test_split(tmp_path / "test.zarr", model_pt)
    onnx_path, report = tmp_path / "train" / "model.onnx", tmp_path / "train" / "onnx.json"
    assert main(["export-onnx", "--model", str(model_pt), "--test", str(test), "--onnx", str(onnx_path),
                 "--report", str(report)]) == 0
    record = json.loads(report.read_text())
    assert record["passed"] and record["n"] == 20 and record["opset"] == 18
    assert 0 <= record["max_abs_diff"] <= 1e-4 and "dynamo" in record["exporter"]
    assert list(onnx_path.parent.iterdir()) and not list(onnx_path.parent.glob("*.data"))  # weights inside
    # the batch axis is dynamic: one sample and a batch other than the export's both run
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    for n in (1, 5):
        (logits,) = session.run(None, {"images": np.zeros((n, *shape[1:]), np.float32)})
        assert logits.shape == (n, len(record["classes"]))


def test_onnx_parity_failure_exits_non_zero_with_the_reason(tmp_path, capsys):
    from haven.cli import main

    model_pt, _ = ct_bundle(tmp_path)
    test = _test_split(tmp_path / "test.zarr", model_pt, n=8)
    report = tmp_path / "onnx.json"
    # a tolerance no float32 graph meets: the check must fail, not pass silently
    rc = main(["export-onnx", "--model", str(model_pt), "--test", str(test), "--onnx", str(tmp_path / "m.onnx"),
               "--report", str(report), "--tolerance", "1e-12"])
    assert rc == 1 and "ONNX parity failed" in capsys.readouterr().err
    assert json.loads(report.read_text())["passed"] is False


def test_onnx_parity_refuses_another_projects_test_split(tmp_path):
    from haven.predict.onnx import export_and_check

    model_pt, _ = ct_bundle(tmp_path / "ct")
    gray_pt, _ = gray_bundle(tmp_path / "gray")
    with pytest.raises(ValueError, match="same project's test split"):
        export_and_check(model_pt, _test_split(tmp_path / "gray.zarr", gray_pt), tmp_path / "m.onnx")


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The CT bundle's pyfunc package logged to a real local store (sqlite) and registered as
    haven-ct version 1, alias champion; the tracking URI restored afterwards."""
    import mlflow

    from haven.predict.pyfunc import log_package

    d = tmp_path_factory.mktemp("package")
    model_pt, metrics = ct_bundle(d / "results")
    uri, before = f"sqlite:///{d / 'mlflow.db'}", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("haven-ct", artifact_location=(d / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_package(model_pt, metrics, name="haven-ct", version=f"run {run.info.run_id}")
        version = mlflow.register_model(info.model_uri, "haven-ct")
        mlflow.MlflowClient().set_registered_model_alias("haven-ct", "champion", version.version)
        files = ct_files(d / "ct", 3) + gray_files(d / "png", 2)
        yield {"uri": uri, "info": info, "model_pt": model_pt, "metrics": metrics, "files": files, "dir": d,
               "bundle": Bundle.load(model_pt, metrics, name="haven-ct", version="1")}
    finally:
        mlflow.set_tracking_uri(before)


def _expected(bundle: Bundle, files: list[Path]) -> pd.DataFrame:
    samples = np.stack([bundle.sample_bytes(p.read_bytes(), p.name)[0] for p in files])
    return pd.DataFrame(bundle.predict(samples))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_pyfunc_from_the_registry_predicts_as_the_bundle_on_dicom_and_png(registered):
    import mlflow

    from haven.predict.pyfunc import load_bundle

    files, bundle = registered["files"], registered["bundle"]
    expected = _expected(bundle, files)
    model = mlflow.pyfunc.load_model("models:/haven-ct@champion")
    by_bytes = model.predict(pd.DataFrame({"data": [_b64(p) for p in files]}))
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in files]}))
    probs = [c for c in expected if c.startswith(("p_", "pcal_"))]
    assert len(probs) == 4 and len(by_bytes) == 5
    np.testing.assert_allclose(by_bytes[probs].to_numpy(), expected[probs].to_numpy(), atol=1e-6)
    assert list(by_bytes["predicted"]) == list(expected["predicted"])
    assert list(by_bytes["input_hash"]) == list(expected["input_hash"])  # the same decoded input
    pd.testing.assert_frame_equal(by_path, by_bytes)
    assert by_bytes["model"].eq("haven-ct").all() and by_bytes["model_version"].str.startswith("run ").all()

    # what `haven predict` loads for a models:/ URI: the same bundle, named after the registry entry
    loaded = load_bundle("models:/haven-ct@champion")
    assert (loaded.name, loaded.version) == ("haven-ct", "1")
    assert loaded.temperature == bundle.temperature and loaded.decision == bundle.decision
    np.testing.assert_allclose(_expected(loaded, files)[probs].to_numpy(), expected[probs].to_numpy(), atol=1e-7)


def test_pyfunc_package_carries_signature_example_and_metadata(registered):
    import mlflow

    info = registered["info"]
    assert [c.name for c in info.signature.inputs.inputs] == ["data", "path", "filename"]
    assert not any(c.required for c in info.signature.inputs.inputs)
    assert {"p_normal", "pcal_hemorrhage", "predicted", "input_hash"} <= set(info.signature.outputs.input_names())
    assert info.metadata["classes"] == ["normal", "hemorrhage"] and info.metadata["input"]["size"] == 32
    assert info.metadata["decision"]["threshold"] == 0.4 and info.metadata["temperature"] == 1.5
    assert "base64" in info.metadata["request"]
    example = mlflow.models.Model.load(info.model_uri).load_input_example(
        mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(registered["dir"] / "dl")))
    assert base64.b64decode(example["data"][0])[:8] == b"\x89PNG\r\n\x1a\n"  # a real PNG
    # haven's code travels with it, less the demo generators (their fictional names and ids would be
    # identifiers in the tracking store: the pipeline's leak check found them there)
    code = registered["dir"] / "dl" / "code" / "haven"
    assert (code / "predict" / "bundle.py").is_file()
    assert not list(code.glob("demo*.py")), sorted(p.name for p in code.glob("demo*.py"))
    assert (Path(haven.__file__).parent / "demolesions.py").is_file()  # there are more than demo.py to leave out


def test_pyfunc_rejects_bad_rows_with_the_row_and_reason(registered):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model("models:/haven-ct/1")
    for frame, reason in ((pd.DataFrame({"data": [base64.b64encode(b"hello world").decode()]}), "cannot be decoded"),
                          (pd.DataFrame({"data": ["not base64!"]}), "not base64"),
                          (pd.DataFrame({"path": [str(registered["dir"] / "missing.dcm")]}), "cannot be read")):
        with pytest.raises(MlflowException, match=f"row 0: .*{reason}"):
            model.predict(frame)


# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_a_dicom_request_like_the_bundle(registered):
    """`mlflow models serve -m models:/haven-ct@champion` (the package's own code and artifacts, the
    local environment) on loopback: a DICOM posted as base64 gets the bundle's probabilities."""
    d, port = registered["dir"], _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    log = open(d / "serve.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                             "models:/haven-ct@champion", "--env-manager", "local", "-h", "127.0.0.1",
                             "-p", str(port), "-w", "1"], env=env, cwd=d, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise AssertionError("mlflow models serve did not start:\n" + (d / "serve.log").read_text()[-3000:])
            time.sleep(0.5)
        started = time.perf_counter() - t0
        dicoms = registered["files"][:2]
        status, body = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["data"],
                                                                        "data": [[_b64(p)] for p in dicoms]}})
        assert status == 200, body
        got = pd.DataFrame(body["predictions"])
        expected = _expected(registered["bundle"], dicoms)
        probs = [c for c in expected if c.startswith(("p_", "pcal_"))]
        np.testing.assert_allclose(got[probs].to_numpy(), expected[probs].to_numpy(), atol=1e-6)
        assert list(got["predicted"]) == list(expected["predicted"])
        assert list(got["input_hash"]) == list(expected["input_hash"])

        # a file that is not an image: a 4xx with the reason, not a 500
        status, body = _post(f"{url}/invocations", {"dataframe_split": {
            "columns": ["data"], "data": [[base64.b64encode(b"%PDF-1.4 not an image").decode()]]}})
        assert 400 <= status < 500 and "cannot be decoded" in body.get("message", ""), (status, body)
        assert "Traceback" not in json.dumps(body) and "stack_trace" not in body
        print(f"mlflow models serve: ready in {started:.1f} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    served = (d / "serve.log").read_text()
    # nothing of the request's DICOM headers reached the server's output
    for planted in ("Doe^Jane", "HOSP99", "ACC00"):
        assert planted not in served
