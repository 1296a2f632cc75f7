"""`haven serve` over real HTTP on loopback: the answers equal `haven predict`'s (Bundle.predict on the
same files), 8 concurrent clients, bad inputs get a 4xx with the reason, and the server's log holds
none of the identifiers a request carried."""

import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundles import ct_bundle, ct_files, gray_bundle, gray_files  # noqa: E402


class Server:
    def __init__(self, folder: Path, model_pt: Path, metrics: Path, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = folder / "server.log"
        self.model_pt, self.metrics = model_pt, metrics
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["haven", "serve", "--model", str(model_pt), "--evaluation", str(metrics),
                                          "--port", str(port), "--threads", "1", *extra],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"haven serve exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        self.stop()
        pytest.fail(f"haven serve did not answer /health:\n{self.log.read_text()}")

    def post(self, files: list[tuple[str, bytes]], path: str = "/predict") -> httpx.Response:
        return httpx.post(self.url + path, files=[("files", (name, data)) for name, data in files], timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def expected(model_pt: Path, metrics: Path, paths: list[Path], kind: str) -> list[dict]:
    """What `haven predict` computes for these files: the CLI's bundle, the stage's samples."""
    from haven import config as cfg
    from haven.predict.resolve import bundle_for

    bundle = bundle_for(cfg.default_settings("predict", "."), model=model_pt, evaluation=metrics)
    return bundle.predict(np.stack([bundle.sample(p, kind) for p in paths]))


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["file"] == i + 1
        for k, v in w.items():
            assert g[k] == pytest.approx(v, abs=1e-6) if isinstance(v, float) else g[k] == v, k


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_ct")
    model_pt, metrics = ct_bundle(folder / "model")
    card = folder / "model_card.md"
    card.write_text("# Model card\n\nA test model; no claim of accuracy.\n")
    server = Server(folder, model_pt, metrics, "--card", str(card), "--max-request-mb", "1", "--max-frames", "64")
    server.files = ct_files(folder / "files", 4)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_gray")
    model_pt, metrics = gray_bundle(folder / "model")
    server = Server(folder, model_pt, metrics, "--max-pixels", "2048")
    server.files = gray_files(folder / "files", 4)
    yield server
    server.stop()


def _dicom(path: Path, change) -> bytes:
    ds = pydicom.dcmread(path)
    change(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_dicom_answers_equal_haven_predict_one_and_several_files_per_request(ct):
    want = expected(ct.model_pt, ct.metrics, ct.files, "dicom")
    r = ct.post([(p.name, p.read_bytes()) for p in ct.files])
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)
    assert {row["kind"] for row in r.json()} == {"dicom"}
    assert len({row["input_hash"] for row in r.json()}) == len(ct.files)  # different inputs, not one answer
    one = ct.post([(ct.files[2].name, ct.files[2].read_bytes())])
    assert_same(one.json(), want[2:3])


def test_png_answers_equal_haven_predict(gray):
    want = expected(gray.model_pt, gray.metrics, gray.files, "image")
    r = gray.post([(p.name, p.read_bytes()) for p in gray.files])
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)


def test_eight_concurrent_clients_all_get_their_own_answer(ct):
    want = expected(ct.model_pt, ct.metrics, ct.files, "dicom")
    jobs = [i % len(ct.files) for i in range(24)]

    def call(i: int):
        return i, ct.post([(ct.files[i].name, ct.files[i].read_bytes())])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, jobs))
    for i, r in results:
        assert r.status_code == 200, r.text
        assert_same(r.json(), want[i:i + 1])


def test_model_health_and_docs(ct):
    model = httpx.get(ct.url + "/model").json()
    assert model["classes"] == ["normal", "hemorrhage"] and model["input"]["mode"] == "ct"
    assert model["temperature"] == 1.5 and model["decision"]["threshold"] == 0.4
    assert model["card"].startswith("# Model card")
    assert httpx.get(ct.url + "/health").json()["status"] == "ok"
    assert httpx.get(ct.url + "/docs").status_code == 200
    assert "/predict" in httpx.get(ct.url + "/openapi.json").json()["paths"]


def test_bad_inputs_get_a_4xx_with_the_reason(ct, gray):
    src = ct.files[0]
    data = src.read_bytes()
    cases = {
        "text file": (ct, [("notes.txt", b"not an image at all\n" * 10)], 415, "not an image"),
        "truncated DICOM": (ct, [("cut.dcm", data[: len(data) // 2])], 422, "cannot be decoded"),
        "DICOM without pixels": (ct, [("sr.dcm", _dicom(src, lambda ds: delattr(ds, "PixelData")))], 422,
                                 "without pixel data"),
        "wrong modality": (ct, [("mr.dcm", _dicom(src, lambda ds: setattr(ds, "Modality", "MR")))], 422,
                           "Modality is MR"),
        "PNG to a CT model": (ct, [("a.png", gray.files[0].read_bytes())], 422, "Hounsfield"),
        "too many frames": (ct, [("mf.dcm", _dicom(src, lambda ds: setattr(ds, "NumberOfFrames", 65)))], 413,
                            "frames"),
        "oversize request": (ct, [("big.dcm", data + bytes(1 << 20))], 413, "larger than the limit"),
        "oversize image": (gray, [("big.png", _png(64))], 413, "pixels"),
        "one bad file among good ones": (ct, [(p.name, p.read_bytes()) for p in ct.files[:2]]
                                         + [("notes.txt", b"hello")], 415, "file 3 of 3"),
    }
    for what, (server, files, status, reason) in cases.items():
        r = server.post(files)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert reason in r.json()["detail"], (what, r.text)
    not_multipart = httpx.post(ct.url + "/predict", content=data, headers={"content-type": "application/dicom"})
    assert not_multipart.status_code == 415 and "multipart" in not_multipart.json()["detail"]
    no_files = httpx.post(ct.url + "/predict", data={"other": "x"}, files=[("other", ("a.dcm", b""))])
    assert no_files.status_code == 422 and "no file" in no_files.json()["detail"]


def _png(size: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_an_unforeseen_error_is_a_generic_500_and_logs_no_content(tmp_path, caplog):
    """In process, with one fault injected into a real bundle (nothing else makes the service fail)."""
    import logging

    from fastapi.testclient import TestClient

    from haven.predict.bundle import Bundle
    from haven.predict.serve import create_app

    bundle = Bundle.load(*ct_bundle(tmp_path))
    files = ct_files(tmp_path / "files", 1)

    def broken(samples, batch_size=64):
        raise RuntimeError("Doe^Jane0 HOSP990000 leaked into an exception")

    bundle.predict = broken
    level = logging.getLogger("pydicom").level
    try:
        with caplog.at_level(logging.INFO, logger="haven.serve"):
            r = TestClient(create_app(bundle)).post("/predict", files=[("files", ("ct0.dcm", files[0].read_bytes()))])
    finally:
        logging.getLogger("pydicom").setLevel(level)
    assert r.status_code == 500 and "internal error" in r.json()["detail"]
    assert "Doe^Jane" not in r.text and "Traceback" not in r.text
    assert "RuntimeError" in caplog.text and "status=500" in caplog.text
    assert "Doe^Jane" not in caplog.text and "HOSP99" not in caplog.text and "ct0.dcm" not in caplog.text


def test_the_dicom_header_is_deidentified_in_memory(ct):
    from haven.predict.uploads import deidentified_header

    data = ct.files[1].read_bytes()
    original = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    ds, has_pixels = deidentified_header(data)
    assert has_pixels and ds.Modality == "CT" and ds.Rows == original.Rows
    text = str(ds) + str(ds.file_meta)
    for value in ("Doe^Jane1", "HOSP990001", "ACC000001", original.StudyInstanceUID, original.SOPInstanceUID,
                  original.StudyDate, original.InstitutionName):
        assert value in str(original) and value not in text


def test_server_logs_hold_no_identifier_of_any_request(ct, gray):
    # identifiers in places a careless server logs: the file name, the query string, the path
    leaky = "Doe^Jane7_HOSP990007_ACC000007.dcm"
    assert ct.post([(leaky, ct.files[0].read_bytes())], path="/predict?patient=HOSP990007").status_code == 200
    assert ct.post([(leaky, b"Doe^Jane7 HOSP990007")]).status_code == 415
    assert httpx.get(ct.url + "/patients/Doe^Jane7").status_code == 404
    planted = ["Doe^Jane", "HOSP99", "ACC0000", "patients", *(p.name for p in ct.files + gray.files)]
    for p in ct.files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        planted += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    for server in (ct, gray):
        log = server.log.read_text()
        assert "status=200" in log and "status=4" in log  # the log has the requests (the check is not vacuous)
        assert "Traceback" not in log
        found = [v for v in planted if v in log]
        assert not found, f"identifiers in the server log: {found}"


def test_the_cli_serves_the_projects_own_model_and_card(tmp_path):
    """Without --model: the project's files as predict.model picks them, and its report's card."""
    import argparse

    from haven import config as cfg
    from haven.cli.serve import _bundle, _card

    ct_bundle(tmp_path / "results" / "proj")
    (tmp_path / "results" / "proj" / "report").mkdir()
    (tmp_path / "results" / "proj" / "report" / "model_card.md").write_text("# proj card\n")
    s = {**cfg.default_settings("predict", "."), "results": str(tmp_path / "results"), "project": "proj"}
    args = argparse.Namespace(model=None, evaluation=None, card=None)
    bundle = _bundle(args, {**s, "predict": {**s["predict"], "model": "this_run"}})
    assert bundle.classes == ["normal", "hemorrhage"] and bundle.temperature == 1.5
    assert _card(args, s) == "# proj card\n"
    with pytest.raises(FileNotFoundError, match="registered.json not found"):
        _bundle(args, s)  # the champion, never registered here
