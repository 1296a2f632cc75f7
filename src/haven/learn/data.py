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
    """A split written by the preprocess stage, read chunk by chunk (whole Zarr chunks).

    ``store`` may be several stores of the same preprocessing (the folds a cross-validation fold
    trains on): they read as one split, in the order given, with the first store's attributes."""

    def __init__(self, store: str | Path | list | tuple):
        import zarr

        stores = [Path(p) for p in store] if isinstance(store, (list, tuple)) else [Path(store)]
        if not stores:
            raise ValueError("a split needs at least one Zarr store")
        self.store = stores[0]
        self.stores = stores
        self.groups = [zarr.open_group(p, mode="r") for p in stores]
        self.group = self.groups[0]
        arrays = [g["images"] for g in self.groups]
        self.images = arrays[0] if len(arrays) == 1 else _Concat(arrays)
        # the task's targets as stored: class indices (N,) for one class per sample, 0/1 floats
        # (N, labels) for several findings at once
        labels = np.concatenate([np.asarray(g["labels"][:]) for g in self.groups])
        self.labels = labels.astype(np.int64) if labels.ndim == 1 else labels.astype(np.float32)
        # a segmentation's targets are its masks (N, H, W), read chunk by chunk beside the images
        # (never the whole split in memory); ``labels`` then says whether an image has foreground
        self.targets = str(self.group.attrs.get("targets", "labels"))
        if self.targets == "masks":
            masks = [g["masks"] for g in self.groups]
            self.masks = masks[0] if len(masks) == 1 else _Concat(masks)
        attrs = dict(self.group.attrs)
        self.classes: list[str] = list(attrs["classes"])
        self.mean = torch.tensor(attrs.get("mean", [0.5] * self.images.shape[1]), dtype=torch.float32)
        self.std = torch.tensor(attrs.get("std", [0.25] * self.images.shape[1]), dtype=torch.float32)
        self.chunk = arrays[0].chunks[0]
        # (array, first sample in it, its first global index) of every whole chunk, in order
        self._chunks = []
        offset = 0
        for a in arrays:
            self._chunks += [(a, s, offset + s) for s in range(0, a.shape[0], a.chunks[0])]
            offset += a.shape[0]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def column(self, name: str) -> np.ndarray:
        return np.concatenate([np.array([str(v) for v in g[name][:].tolist()], dtype=str) for g in self.groups])

    def _read_group(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [self._chunks[int(c)] for c in chunks]
        x = np.concatenate([a[s:s + a.chunks[0]] for a, s, _ in parts])
        if self.targets == "masks":
            y = np.concatenate([self._mask_rows(g, min(a.chunks[0], a.shape[0] - s)) for a, s, g in parts])
        else:
            y = np.concatenate([self.labels[g:g + min(a.chunks[0], a.shape[0] - s)] for a, s, g in parts])
        return x, y

    def _mask_rows(self, start: int, n: int) -> np.ndarray:
        if isinstance(self.masks, _Concat):
            return np.stack([self.masks[i] for i in range(start, start + n)])
        return np.asarray(self.masks[start:start + n])

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

        starts = np.arange(len(self._chunks))  # chunk numbers (whole chunks of one store each)
        if shuffle:
            starts = rng.permutation(starts)
        rank, world = shard
        starts = starts[rank::world]
        groups = [starts[g:g + buffer_chunks] for g in range(0, len(starts), buffer_chunks)]
        # a class-balanced sampler needs one class per sample (a segmentation: foreground or not)
        balanced = balanced and self.labels.ndim == 1
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
                    w = class_weight[y if self.targets != "masks" else (y.reshape(len(y), -1) > 0).any(1).astype(int)]
                    order = rng.choice(len(x), size=len(x), replace=True, p=w / w.sum())
                else:
                    order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
                for b in range(0, len(x), batch_size):
                    idx = order[b:b + batch_size]
                    xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
                    if pin_memory:
                        xb, yb = xb.pin_memory(), yb.pin_memory()
                    yield xb, yb


class _Concat:
    """Several stores' image arrays as one, for the indexing the stages use (``a[i]``, ``shape``)."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.ends = np.cumsum([a.shape[0] for a in arrays])
        self.shape = (int(self.ends[-1]),) + tuple(arrays[0].shape[1:])
        self.chunks = arrays[0].chunks

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.ends, i, side="right"))
        return self.arrays[k][int(i - (self.ends[k - 1] if k else 0))]


def store_dims(split: ZarrSplit) -> int:
    """3 for a volume project's store (attrs ``dims: 3``, images (N, C, D, H, W)), else 2."""
    return int(split.group.attrs.get("dims", 2))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) or volumes (N, C, D, H, W) → float, normalized with the train split's
    statistics (on device)."""
    x = x.float().div_(255.0)
    shape = (1, -1) + (1,) * (x.ndim - 2)  # per channel, whatever the spatial dimensions
    return (x - mean.view(shape).to(x.device)) / std.view(shape).to(x.device)


def augment_pair(x: torch.Tensor, masks: torch.Tensor, aug: dict, strength: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment` of images and their masks (N, H, W) together: the same affine grid per
    sample moves both, the masks with nearest sampling (a class stays a class) and padded with
    background; brightness/contrast touch the images only."""
    if not aug or strength <= 0:
        return x, masks
    out, grid = augment(x, aug, strength, generator, return_grid=True)
    moved = torch.nn.functional.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                            align_corners=False)
    return out, moved[:, 0].round().to(masks.dtype)


def augment(x: torch.Tensor, aug: dict, strength: float, generator: torch.Generator | None = None,
            return_grid: bool = False):
    """Per-sample random augmentation of a float batch, on its own device, in one pass.

    Flips, rotation (degrees), isotropic scale range and translation (fraction of the side)
    become one affine grid per sample (``affine_grid``/``grid_sample``), then per-sample
    brightness/contrast jitter.  ``strength`` scales every magnitude (0 turns augmentation
    off), so one tunable knob sets how hard the project augments.
    """
    if not aug or strength <= 0:
        return (x, None) if return_grid else x
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
    return (out, grid) if return_grid else out
