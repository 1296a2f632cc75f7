"""Training throughput: (a) synthetic batches already on the device (the compute bound) and
(b) the same training step fed by haven's Zarr loader from disk; prints both and b/a.

GPU (the issue's setting): ResNet50, 224², AMP bf16, channels_last, batch 256.
    python benchmarks/train_throughput.py
CPU (no GPU here): the same code with a smaller default model/size/batch so it finishes:
    python benchmarks/train_throughput.py            # picks CPU defaults when no GPU
    python benchmarks/train_throughput.py --model resnet50 --size 224 --batch 256 --steps 20
Anchor: NVIDIA DeepLearningExamples, ResNet50 AMP on one A100 80GB: 2,470 img/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def make_store(path: Path, n: int, size: int, chunk: int) -> None:
    import zarr
    from zarr.codecs import BloscCodec

    g = zarr.open_group(path, mode="w")
    rng = np.random.default_rng(0)
    images = g.create_array("images", shape=(n, 3, size, size), chunks=(chunk, 3, size, size), dtype="uint8",
                            compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"))
    # smooth-ish content so compression behaves like photos, not like noise or zeros
    base = rng.integers(0, 255, (chunk, 3, size // 8, size // 8), dtype=np.uint8)
    tile = np.kron(base, np.ones((1, 1, 8, 8), dtype=np.uint8))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        images[s:s + m] = (tile[:m] + rng.integers(0, 16, tile[:m].shape, dtype=np.uint8))
    g.create_array("labels", data=rng.integers(0, 1000, n).astype(np.int64), chunks=(n,))
    g.attrs.update({"classes": [str(i) for i in range(1000)], "mean": [0.5] * 3, "std": [0.25] * 3})


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50" if cuda else "resnet18")
    ap.add_argument("--size", type=int, default=224 if cuda else 64)
    ap.add_argument("--batch", type=int, default=256 if cuda else 64)
    ap.add_argument("--steps", type=int, default=50 if cuda else 10)
    ap.add_argument("--warmup", type=int, default=10 if cuda else 2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from haven.learn.models import build_model
    from haven.learn.data import ZarrSplit, normalize

    dev = torch.device("cuda" if cuda else "cpu")
    model = build_model(args.model, 1000, weights=None).to(dev).to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(x, y):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # (a) compute bound: the batch already lives on the device
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    for _ in range(args.warmup):
        step(x, y)
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    sync()
    a = args.steps * args.batch / (time.perf_counter() - t)

    # (b) the real loader: uint8 Zarr chunks from disk → pinned → device → normalize
    n = (args.steps + args.warmup) * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.zarr"
        make_store(store, n, args.size, chunk=64)
        split = ZarrSplit(store)
        rng = np.random.default_rng(0)
        it = split.batches(args.batch, shuffle=True, rng=rng, pin_memory=cuda)
        for _ in range(args.warmup):
            xb, yb = next(it)
            step(normalize(xb.to(dev, non_blocking=True), split.mean, split.std)
                 .contiguous(memory_format=torch.channels_last), (yb % 1000).to(dev, non_blocking=True))
        sync()
        t = time.perf_counter()
        seen = 0
        for xb, yb in it:
            step(normalize(xb.to(dev, non_blocking=True), split.mean, split.std)
                 .contiguous(memory_format=torch.channels_last), (yb % 1000).to(dev, non_blocking=True))
            seen += len(yb)
        sync()
        b = seen / (time.perf_counter() - t)

    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.model} {args.size}x{args.size} batch {args.batch}"
          f"{' bf16 AMP' if cuda else ' fp32'} channels_last{' compiled' if args.compile else ''}")
    print(f"(a) synthetic on-device : {a:9.1f} img/s")
    print(f"(b) Zarr loader         : {b:9.1f} img/s")
    print(f"b/a                     : {b / a:9.3f}")
    if cuda and args.model == "resnet50" and args.size == 224:
        print(f"(a) vs A100 anchor 2470 : {a / 2470:9.2f}x")


if __name__ == "__main__":
    main()
