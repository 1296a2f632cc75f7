"""Tile features of whole-slide images from a pretrained backbone, cached to one Zarr group.

Features are computed once per slide (the backbone frozen, in eval mode, no grad) so that the
attention-MIL head (:mod:`haven.learn.mil`) trains on cached vectors, never on pixels.  Peak memory
is one batch of tiles (:func:`haven.learn.tiles.read_tiles`), never a whole slide.

The store's layout (a ragged bag per slide, read without loading the cohort):

* ``features`` float32 (T, F), T the cohort's tiles, chunks of :data:`CHUNK_ROWS` rows: a bag is
  rows ``offsets[i]:offsets[i + 1]``, reading only the chunks it overlaps (Zarr chunks are regular,
  so "a chunk per slide" would need padding every bag to the largest);
* ``coords`` int64 (T, 2): each tile's level-0 (x, y), for the attention heatmap;
* ``offsets`` int64 (S + 1,), ``slides`` UTF-8 (S,): the slides' ids (pseudonyms) in order;
* group attrs ``tile_px``, ``mpp``, ``feature_dim``, ``backbone`` (its haven_info name, if any).

Bytes are deterministic for the same inputs (the same order of writes, Blosc, no time stamps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["CHUNK_ROWS", "FeatureStore", "extract_features", "feature_backbone", "open_feature_store",
           "write_feature_store"]

CHUNK_ROWS = 256  # 256 x 1280 float32 = 1.3 MB a chunk for efficientnet_lite0


def feature_backbone(backbone: str = "efficientnet_lite0", weights: str | None = "package:efficientnet_lite0"
                     ) -> nn.Module:
    """A pretrained backbone (offline weights, :func:`haven.learn.models.build_model`) in eval mode."""
    from haven.learn.models import build_model

    return build_model(backbone, None, weights=weights).eval()


def _embed(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features: timm's pre-logits (whatever head the model has), else the module's output."""
    if hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head"):
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    return backbone(x).flatten(1)


def _normalisation(backbone: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean/std the weights expect (ImageNet's, or 0.5 for the packaged EfficientNet-Lite0)."""
    from haven.learn.models import data_config

    cfg = data_config(backbone)
    mean = torch.tensor(cfg["mean"][:3], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"][:3], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def _batches_of_features(slide_path, coords, backbone, tile_px, mpp, batch_size, device, default_mpp=None):
    from haven.learn import tiles

    device = torch.device(device)
    backbone.eval().to(device)
    mean, std = _normalisation(backbone, device)
    slide = tiles.open_slide(slide_path)
    slide._haven_name = str(slide_path)
    try:
        with torch.inference_mode():
            for batch in tiles.read_tiles(slide, coords, tile_px, mpp, batch_size, default_mpp):
                # NHWC uint8 → NCHW float whose memory stays NHWC: channels-last for free
                x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
                yield _embed(backbone, (x - mean) / std).float().cpu().numpy()
    finally:
        slide.close()


def extract_features(slide_path, coords: np.ndarray, backbone: nn.Module, tile_px: int, mpp: float,
                     batch_size: int = 64, device="cpu", default_mpp: float | None = None) -> np.ndarray:
    """(N, F) float32 features of the tiles at ``coords`` (level-0 x, y) of one slide."""
    parts = list(_batches_of_features(slide_path, coords, backbone, tile_px, mpp, batch_size, device, default_mpp))
    if not parts:
        return np.zeros((0, feature_dim(backbone, tile_px)), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def feature_dim(backbone: nn.Module, tile_px: int) -> int:
    """F, from the model (timm's ``num_features``) or one blank tile through it."""
    n = getattr(backbone, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    p = next(backbone.parameters())
    with torch.inference_mode():
        return int(_embed(backbone.eval(), torch.zeros(1, 3, tile_px, tile_px, device=p.device)).shape[1])


def write_feature_store(out: Path, slides: list[dict], backbone: nn.Module, tile_px: int, mpp: float,
                        batch_size: int = 64, device="cpu", default_mpp: float | None = None) -> dict:
    """Features of every slide (dicts of ``id``, ``path``, ``coords``) into a new Zarr group at ``out``,
    one batch at a time; returns the group's attrs plus ``tiles`` (T)."""
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.dtype import VariableLengthUTF8

    counts = [len(np.asarray(s["coords"]).reshape(-1, 2)) for s in slides]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total, dim = int(offsets[-1]), feature_dim(backbone, tile_px)
    group = zarr.open_group(str(out), mode="w")
    codec = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")  # float32: byte shuffle suits it
    feats = group.create_array("features", shape=(total, dim), chunks=(CHUNK_ROWS, dim), dtype="float32",
                               compressors=codec)
    coords = group.create_array("coords", shape=(total, 2), chunks=(max(total, 1), 2), dtype="int64")
    group.create_array("offsets", shape=(len(offsets),), chunks=(len(offsets),), dtype="int64")[:] = offsets
    ids = group.create_array("slides", shape=(len(slides),), dtype=VariableLengthUTF8(),
                             chunks=(max(len(slides), 1),))
    if slides:
        ids[:] = np.array([str(s["id"]) for s in slides], dtype=object)
    if total:
        coords[:] = np.concatenate([np.asarray(s["coords"], np.int64).reshape(-1, 2) for s in slides])
    for s, start in zip(slides, offsets[:-1]):
        row = int(start)
        for part in _batches_of_features(s["path"], s["coords"], backbone, tile_px, mpp, batch_size, device,
                                         default_mpp):
            feats[row:row + len(part)] = part
            row += len(part)
    attrs = {"tile_px": int(tile_px), "mpp": float(mpp), "feature_dim": dim,
             "backbone": str(getattr(backbone, "haven_info", {}).get("backbone", type(backbone).__name__))}
    group.attrs.update(attrs)
    return {**attrs, "tiles": total}


class FeatureStore:
    """A written feature store, read a bag at a time."""

    def __init__(self, path: Path):
        import zarr

        self.group = zarr.open_group(str(path), mode="r")
        self.offsets = np.asarray(self.group["offsets"][:], np.int64)
        self.ids = [str(s) for s in self.group["slides"][:]]
        self.attrs = dict(self.group.attrs)

    def __len__(self) -> int:
        return len(self.ids)

    def bag(self, slide: int | str) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, F) float32, coords (n, 2)) of one slide, by index or id."""
        i = self.ids.index(slide) if isinstance(slide, str) else int(slide)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.group["features"][a:b]), np.asarray(self.group["coords"][a:b])


def open_feature_store(path: Path) -> FeatureStore:
    return FeatureStore(path)
