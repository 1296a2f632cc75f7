"""The data a stage trains on: a Zarr split written by the preprocess stage, read whole chunk by
whole chunk, its normalization, and the per-sample augmentation of a training batch.

Every task reads the same stores (images plus the targets preprocess encoded), so this module
knows nothing about what the targets mean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class ZarrSplit:
    """A split written by the preprocess stage, read chunk by chunk (whole Zarr chunks)."""

    def __init__(self, store: str | Path):
        import zarr

        self.store = Path(store)
        self.group = zarr.open_group(self.store, mode="r")
        self.images = self.group["images"]
        self.labels = np.asarray(self.group["labels"][:], dtype=np.int64)
        attrs = dict(self.group.attrs)
        self.classes: list[str] = list(attrs["classes"])
        self.mean = torch.tensor(attrs.get("mean", [0.5] * self.images.shape[1]), dtype=torch.float32)
        self.std = torch.tensor(attrs.get("std", [0.25] * self.images.shape[1]), dtype=torch.float32)
        self.chunk = self.images.chunks[0]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def column(self, name: str) -> np.ndarray:
        return np.array([str(v) for v in self.group[name][:].tolist()], dtype=str)

    def _read_group(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([self.images[s:s + self.chunk] for s in starts])
        y = np.concatenate([self.labels[s:s + self.chunk] for s in starts])
        return x, y

    def batches(self, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None,
                buffer_chunks: int = 8, prefetch: int = 2, balanced: bool = False,
                pin_memory: bool = False, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels) batches, reading whole Zarr chunks.

        With ``shuffle`` the chunk order is permuted and samples are shuffled inside a buffer
        of ``buffer_chunks`` chunks; ``prefetch`` buffers are read ahead by background threads
        (Blosc decompression releases the GIL).  ``balanced`` resamples each buffer with
        probabilities inversely proportional to class frequency (a balanced sampler).
        ``shard=(rank, world)`` keeps every world-th chunk of the (shuffled) chunk order, from
        ``rank`` on: the ranks of a data-parallel run read disjoint chunks.
        """
        from concurrent.futures import ThreadPoolExecutor

        n = len(self)
        starts = np.arange(0, n, self.chunk)
        if shuffle:
            starts = rng.permutation(starts)
        rank, world = shard
        starts = starts[rank::world]
        groups = [starts[g:g + buffer_chunks] for g in range(0, len(starts), buffer_chunks)]
        if balanced:
            counts = np.bincount(self.labels, minlength=len(self.classes)).astype(np.float64)
            class_weight = 1.0 / np.maximum(counts, 1)
        with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
            pending = [pool.submit(self._read_group, g) for g in groups[:prefetch + 1]]
            for i in range(len(groups)):
                x, y = pending[i].result()
                if i + prefetch + 1 < len(groups):
                    pending.append(pool.submit(self._read_group, groups[i + prefetch + 1]))
                pending[i] = None  # release the buffer once consumed
                if balanced and shuffle:
                    w = class_weight[y]
                    order = rng.choice(len(x), size=len(x), replace=True, p=w / w.sum())
                else:
                    order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
                for b in range(0, len(x), batch_size):
                    idx = order[b:b + batch_size]
                    xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
                    if pin_memory:
                        xb, yb = xb.pin_memory(), yb.pin_memory()
                    yield xb, yb


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) → float, normalized with the train split's statistics (on device)."""
    x = x.float().div_(255.0)
    return (x - mean.view(1, -1, 1, 1).to(x.device)) / std.view(1, -1, 1, 1).to(x.device)


def augment(x: torch.Tensor, aug: dict, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random augmentation of a float batch, on its own device, in one pass.

    Flips, rotation (degrees), isotropic scale range and translation (fraction of the side)
    become one affine grid per sample (``affine_grid``/``grid_sample``), then per-sample
    brightness/contrast jitter.  ``strength`` scales every magnitude (0 turns augmentation
    off), so one tunable knob sets how hard the project augments.
    """
    if not aug or strength <= 0:
        return x
    n, dev = x.shape[0], x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    angle = (rand(n) * 2 - 1) * math.radians(aug["rotate"]) * strength
    lo, hi = aug["scale"]
    scale = 1 + ((lo - 1) + rand(n) * (hi - lo)) * strength
    shift = (rand(n, 2) * 2 - 1) * 2 * aug["translate"] * strength
    flip_x = torch.where(rand(n) < (0.5 if aug["hflip"] else 0.0), -1.0, 1.0).to(dev)
    flip_y = torch.where(rand(n) < (0.5 if aug["vflip"] else 0.0), -1.0, 1.0).to(dev)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip_x, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos * flip_y, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, c = aug["brightness"] * strength, aug["contrast"] * strength
    if b or c:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        gain = (1 + (rand(n, 1, 1, 1) * 2 - 1) * c).to(out.dtype)
        bias = ((rand(n, 1, 1, 1) * 2 - 1) * b).to(out.dtype)
        out = (out - mean) * gain + mean + bias
    return out
