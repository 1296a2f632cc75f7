"""Tissue detection and tiling of a whole-slide image, read with tiffslide.

* :func:`tissue_mask` finds tissue on the slide's lowest pyramid level (a few hundred to a few
  thousand pixels a side: the whole slide in memory at once, cheaply): Otsu's threshold on the
  saturation or on the darkness (1 - grey) image, whichever Otsu separates better (stained tissue
  is coloured and glass is near-white and grey, but a weakly stained or grey scan separates on
  brightness only), joined by local contrast (texture: a vacuolated region), then a
  closing and hole filling (white lipid vacuoles and lumina inside tissue are tissue: steatosis is
  graded on them) and the removal of small objects (dust, debris).
* :func:`tile_grid` lays a grid of non-overlapping tiles over level 0, sized so that a tile is
  ``tile_px`` pixels at the target microns per pixel, keeps those whose tissue fraction in the mask
  is at least ``min_tissue``, and caps them at ``max_tiles`` by a seeded sample.
* :func:`read_tiles` reads the tiles in batches from the level nearest the target resolution
  (``get_best_level_for_downsample``: the level at or above it, never an upsampled one) and resizes
  when that level's resolution differs; peak memory is one batch.

Coordinates are level-0 pixels (x, y) of a tile's top-left corner, tiffslide's ``read_region``
convention.  tiffslide, not OpenSlide: it reads the same Aperio files with no C library, its
``read_region`` returns numpy arrays, and it is what :mod:`haven.sources.slides` reads with.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["open_slide", "read_tiles", "slide_mpp", "tile_grid", "tile_slide", "tissue_mask"]

MIN_OBJECT_UM2 = 10_000.0  # 0.01 mm²: smaller specks are dust or debris, not a biopsy's tissue
MIN_GAP = 0.04  # of [0, 1]: ~10 grey levels; glass noise is a few, the faintest tissue well over
CLOSE_UM = 64.0  # closing radius: bridges vacuole clusters at a core's edge; less than the gap between cores


def open_slide(slide):
    """A ``tiffslide.TiffSlide`` for a path (a slide object is returned as it is)."""
    if isinstance(slide, (str, os.PathLike)):
        import tiffslide

        return tiffslide.TiffSlide(str(slide))
    return slide


def _name(slide) -> str:
    return str(getattr(slide, "_haven_name", None) or getattr(getattr(slide, "ts_filehandle", None), "path", None)
               or "the slide")


def slide_mpp(slide, default: float | None = None) -> float:
    """Level-0 microns per pixel from the slide's metadata (``tiffslide.mpp-x``), else ``default``;
    ValueError naming the file and the fix when neither is there."""
    slide = open_slide(slide)
    value = slide.properties.get("tiffslide.mpp-x")
    if value:
        return float(value)
    if default:
        return float(default)
    raise ValueError(f"{_name(slide)}: the slide does not state its microns per pixel (no MPP in its metadata), "
                     "so tiles at a target resolution cannot be sized: set a default mpp for the project's slides "
                     "in the config (the scanner's level-0 resolution, e.g. 0.5 for a 20x scan, 0.25 for 40x), or "
                     "re-export the slide with its resolution")


def _otsu_split(img: np.ndarray) -> tuple[float, float, float]:
    """(threshold, separability, gap): Otsu's threshold, its between-class / total variance, and
    the difference of the two classes' means."""
    from skimage.filters import threshold_otsu

    total = float(img.var())
    if total < 1e-10:
        return float(img.max()) + 1.0, 0.0, 0.0
    t = float(threshold_otsu(img))
    hi = img > t
    w1 = float(hi.mean())
    gap = float(img[hi].mean()) - float(img[~hi].mean()) if 0 < w1 < 1 else 0.0
    return t, w1 * (1 - w1) * gap**2 / total, gap


def tissue_mask(slide, min_object_um2: float = MIN_OBJECT_UM2) -> tuple[np.ndarray, float]:
    """(bool mask of the lowest level, that level's downsample from level 0).

    A slide with no mpp is masked with the small-object and closing sizes taken at 0.5 um/px."""
    from skimage import color, morphology
    from scipy import ndimage

    slide = open_slide(slide)
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    rgb = np.asarray(slide.read_region((0, 0), level, (w, h), as_array=True))[..., :3]
    downsample = float(slide.level_downsamples[level])
    rgb = rgb.astype(np.float64) / 255.0  # float64: the local variance is a small difference of squares
    grey = color.rgb2gray(rgb)
    # a 3x3 median takes out speckle and, unlike a blur, does not move the tissue's edge outwards
    sat = ndimage.median_filter(color.rgb2hsv(rgb)[..., 1], size=3)
    dark = ndimage.median_filter(1.0 - grey, size=3)
    (t_s, sep_s, gap_s), (t_d, sep_d, gap_d) = _otsu_split(sat), _otsu_split(dark)
    mask, gap = (sat > t_s, gap_s) if sep_s >= sep_d else (dark > t_d, gap_d)
    # Otsu splits any image, plain glass's noise too: a split of less than MIN_GAP is no tissue
    mask &= gap >= MIN_GAP
    # tissue full of lipid vacuoles is as white as glass but textured (the vacuoles' rims), glass is
    # flat: local contrast finds it, eroded by the window's reach that it blurs outwards by,
    # over 3x3 (a reach of one pixel, which the erosion takes back exactly)
    contrast = np.sqrt(np.clip(ndimage.uniform_filter(grey**2, 3) - ndimage.uniform_filter(grey, 3) ** 2, 0, None))
    t_c, _, gap_c = _otsu_split(contrast)
    if gap_c >= MIN_GAP:
        mask |= morphology.erosion(contrast > t_c, morphology.disk(1))
    if not mask.any():
        return np.zeros((h, w), bool), downsample
    um = float(slide.properties.get("tiffslide.mpp-x") or 0.5) * downsample  # um per mask pixel
    radius = max(1, int(round(CLOSE_UM / um)))
    # padded with glass: a footprint reaching past the border must not close tissue onto its mirror image
    padded = np.pad(mask, radius)
    mask = morphology.closing(padded, morphology.disk(radius)).astype(bool)[radius:-radius, radius:-radius]
    mask = ndimage.binary_fill_holes(mask)
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(min_object_um2 / um**2)))
    return mask, downsample


def _integral(mask: np.ndarray) -> np.ndarray:
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    s[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return s


def tile_grid(slide, mask: np.ndarray, downsample: float, tile_px: int, mpp: float, max_tiles: int,
              min_tissue: float, seed: int, default_mpp: float | None = None) -> np.ndarray:
    """(N, 2) int64 level-0 (x, y) of the tiles with tissue fraction >= ``min_tissue``, in raster order
    (rows, then columns); more than ``max_tiles`` are sampled down to it by ``seed`` (deterministic)."""
    slide = open_slide(slide)
    size0 = tile_px * mpp / slide_mpp(slide, default_mpp)  # a tile's side in level-0 px
    w0, h0 = slide.level_dimensions[0]
    nx, ny = int(w0 // size0), int(h0 // size0)
    if nx == 0 or ny == 0:
        return np.zeros((0, 2), np.int64)
    gx = np.rint(np.arange(nx) * size0).astype(np.int64)
    gy = np.rint(np.arange(ny) * size0).astype(np.int64)
    # each tile's footprint in mask pixels (at least one), its tissue fraction by a summed-area table
    mh, mw = mask.shape
    x0 = np.clip(np.floor(gx / downsample).astype(np.int64), 0, mw - 1)
    y0 = np.clip(np.floor(gy / downsample).astype(np.int64), 0, mh - 1)
    x1 = np.clip(np.maximum(np.ceil((gx + size0) / downsample).astype(np.int64), x0 + 1), 1, mw)
    y1 = np.clip(np.maximum(np.ceil((gy + size0) / downsample).astype(np.int64), y0 + 1), 1, mh)
    s = _integral(mask)
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    tissue = (s[y1][:, x1] - s[y0][:, x1] - s[y1][:, x0] + s[y0][:, x0]) / area
    iy, ix = np.nonzero(tissue >= min_tissue)  # raster order
    coords = np.stack([gx[ix], gy[iy]], axis=1).astype(np.int64)
    if max_tiles and len(coords) > max_tiles:
        keep = np.random.default_rng(seed).choice(len(coords), size=max_tiles, replace=False)
        coords = coords[np.sort(keep)]
    return coords.reshape(-1, 2)


def read_plan(slide, tile_px: int, mpp: float, default_mpp: float | None = None) -> tuple[int, int]:
    """(level, side in that level's px) that covers one tile of ``tile_px`` at ``mpp``."""
    slide = open_slide(slide)
    ds = mpp / slide_mpp(slide, default_mpp)
    level = slide.get_best_level_for_downsample(ds)
    side = max(1, int(round(tile_px * ds / float(slide.level_downsamples[level]))))
    return level, side


def read_tiles(slide, coords: np.ndarray, tile_px: int, mpp: float, batch_size: int = 64,
               default_mpp: float | None = None) -> Iterator[np.ndarray]:
    """(n, tile_px, tile_px, 3) uint8 batches of the tiles at ``coords``, in their order."""
    from PIL import Image

    slide = open_slide(slide)
    level, side = read_plan(slide, tile_px, mpp, default_mpp)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    for start in range(0, len(coords), batch_size):
        chunk = coords[start:start + batch_size]
        out = np.empty((len(chunk), tile_px, tile_px, 3), np.uint8)
        for i, (x, y) in enumerate(chunk):
            tile = np.asarray(slide.read_region((int(x), int(y)), level, (side, side), as_array=True))[..., :3]
            if side != tile_px:  # PIL's resize filters over the source footprint (antialiased)
                tile = np.asarray(Image.fromarray(tile).resize((tile_px, tile_px), Image.Resampling.BILINEAR))
            out[i] = tile
        yield out


def tile_slide(path: str | Path, tile_px: int, mpp: float, max_tiles: int, min_tissue: float, seed: int,
               default_mpp: float | None = None) -> np.ndarray:
    """Tissue mask and tile grid of one slide file in one call: the tiles' level-0 (x, y)."""
    slide = open_slide(path)
    slide._haven_name = str(path)
    try:
        mask, ds = tissue_mask(slide)
        return tile_grid(slide, mask, ds, tile_px, mpp, max_tiles, min_tissue, seed, default_mpp)
    finally:
        slide.close()
