"""`haven serve` latency and throughput on CPU: p50/p99 latency and requests/s with 1 and 8
concurrent clients, against a bare in-process call of the same work (``Bundle.sample_bytes`` +
``Bundle.predict`` on the same file, one file at a time).

A real server (``haven serve`` as a subprocess on loopback) and real files: pydicom's
``CT_small.dcm`` for a 3-window CT model and a demo digit PNG (8 x 8, as ``haven.demo`` writes
them) for a 10-class gray model.  The models are seeded random resnet18s at the demo's input size
(``tests/bundles.py``): their speed is a trained model's, their answers mean nothing.  Each client
keeps one HTTP connection (httpx) and sends one file per request.

    python benchmarks/serve.py                      # 200 requests per setting, 2 torch threads
    python benchmarks/serve.py --requests 500 --threads 4 --size 64
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_models(folder: Path, size: int) -> dict[str, tuple[Path, Path, bytes, str]]:
    """name → (model.pt, metrics.json, the file's bytes, its file name)."""
    from PIL import Image
    from pydicom.data import get_testdata_file
    from sklearn.datasets import load_digits

    from bundles import CT_WINDOWS, write_bundle

    ct = write_bundle(folder / "ct", classes=["normal", "hemorrhage"], in_chans=3,
                      pixels={"size": size, "mode": "ct", "windows": CT_WINDOWS, "slab": 0})
    gray = write_bundle(folder / "gray", classes=[str(i) for i in range(10)], in_chans=1, threshold=None,
                        pixels={"size": size, "mode": "gray", "windows": CT_WINDOWS, "slab": 0})
    png = io.BytesIO()
    Image.fromarray(np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8), mode="L").save(png, format="PNG")
    return {"CT_small.dcm (CT model)": (*ct, Path(get_testdata_file("CT_small.dcm")).read_bytes(), "CT_small.dcm"),
            "digit PNG 8x8 (gray model)": (*gray, png.getvalue(), "digit.png")}


def start(model_pt: Path, metrics: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "haven"), "serve", "--model", str(model_pt),
                                 "--evaluation", str(metrics), "--port", str(port), "--threads", str(threads)],
                                stdout=out, stderr=subprocess.STDOUT)
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"haven serve exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"haven serve did not start:\n{log.read_text()}")


def load(url: str, data: bytes, name: str, clients: int, requests: int) -> dict:
    """``requests`` POST /predict of one file from ``clients`` threads (one connection each)."""
    import httpx

    per = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(n: int) -> list[float]:
        times = []
        with httpx.Client(timeout=120) as c:
            for _ in range(n):
                t = time.perf_counter()
                r = c.post(url + "/predict", files=[("files", (name, data))])
                times.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise SystemExit(f"POST /predict answered {r.status_code}: {r.text}")
        return times

    client(min(10, requests))  # warm-up: first requests pay for lazy imports and allocator growth
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.concatenate([np.asarray(t) for t in pool.map(client, per)])
    wall = time.perf_counter() - started
    return {"p50_ms": 1000 * np.percentile(latencies, 50), "p99_ms": 1000 * np.percentile(latencies, 99),
            "rps": len(latencies) / wall}


def bare(model_pt: Path, metrics: Path, data: bytes, name: str, calls: int) -> dict:
    """The same work in this process, without HTTP: decode the bytes, predict one sample."""
    from haven import config as cfg
    from haven.predict.resolve import bundle_for

    bundle = bundle_for(cfg.default_settings("predict", "."), model=model_pt, evaluation=metrics)
    for _ in range(10):
        bundle.predict(bundle.sample_bytes(data, name)[0][None])
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        bundle.predict(bundle.sample_bytes(data, name)[0][None])
        times.append(time.perf_counter() - t)
    # the rate of the median call: on a shared machine a few stalled calls would dominate the mean
    p50 = 1000 * np.percentile(times, 50)
    return {"p50_ms": p50, "p99_ms": 1000 * np.percentile(times, 99), "rps": 1000 / p50}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per (file, clients) setting")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2, help="torch threads, server and in-process alike")
    ap.add_argument("--size", type=int, default=64, help="the models' input size (the demo's: 64)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for label, (model_pt, metrics, data, name) in make_models(Path(tmp), args.size).items():
            base = bare(model_pt, metrics, data, name, args.requests)
            print(f"\n{label}, {len(data)} bytes, {args.size} px, {args.threads} torch thread(s)")
            print(f"  in-process sample_bytes+predict: p50 {base['p50_ms']:.1f} ms, p99 {base['p99_ms']:.1f} ms, "
                  f"{base['rps']:.1f} calls/s (1 / p50)")
            proc, url = start(model_pt, metrics, args.threads, Path(tmp) / "server.log")
            try:
                for clients in args.clients:
                    r = load(url, data, name, clients, args.requests)
                    print(f"  haven serve, {clients} client(s): p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                          f"{r['rps']:.1f} req/s  (p50 x{r['p50_ms'] / base['p50_ms']:.2f} of in-process, "
                          f"throughput {r['rps'] / base['rps']:.2f} of it)")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
