"""Tissue detection, tiling at a target mpp and tile reading on small synthetic Aperio-layout slides."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from haven.learn import slidefeatures, tiles

LIB = "Aperio Image Library v12.0.16"


def write_svs(path: Path, level0: np.ndarray, mpp: float | None, downsamples=(4, 16)) -> Path:
    """``level0`` as the shared slide layout (level 0, thumbnail, lower levels); lossless tiles so a
    read can be compared with the drawn pixels."""
    h, w = level0.shape[:2]
    mpp_item = f"|MPP = {mpp}" if mpp else ""
    kw = {"photometric": "rgb", "metadata": None, "compression": "zlib"}
    levels = [np.asarray(Image.fromarray(level0).resize((w // f, h // f), Image.BOX)) for f in downsamples]
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), description=f"{LIB} \n{w}x{h} [0,0 {w}x{h}] (256x256) RAW/RGB"
                  f"|AppMag = 20{mpp_item}", **kw)
        thumb = levels[0][::2, ::2]
        tif.write(thumb, rowsperstrip=16, description=f"{LIB} \n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - ", **kw)
        for lv in levels:
            tif.write(lv, tile=(256, 256) if min(lv.shape[:2]) >= 256 else (16, 16),
                      description=f"{LIB} \n{w}x{h} [0,0 {w}x{h}] -> {lv.shape[1]}x{lv.shape[0]} RAW/RGB", **kw)
    return path


def synthetic(h=1024, w=1536, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """White glass with noise and an elliptical textured pink region; (image, drawn region)."""
    rng = np.random.default_rng(seed)
    img = np.clip(240 + rng.normal(0, 3, (h, w, 3)), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    region = ((yy - h * 0.5) / (h * 0.3)) ** 2 + ((xx - w * 0.45) / (w * 0.3)) ** 2 < 1
    texture = np.stack([180 + 40 * rng.random((h, w)), 90 + 60 * rng.random((h, w)), 150 + 50 * rng.random((h, w))], -1)
    img[region] = texture[region]
    return img.astype(np.uint8), region


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    img, region = synthetic()
    path = write_svs(tmp_path_factory.mktemp("slides") / "s.svs", img, mpp=0.25)
    return path, img, region


def test_tissue_mask_finds_drawn_region(slide_file):
    path, img, region = slide_file
    mask, ds = tiles.tissue_mask(path)
    assert ds == pytest.approx(16)
    truth = np.asarray(Image.fromarray(region).resize(mask.shape[::-1], Image.NEAREST))
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9, iou


def test_tissue_mask_of_empty_glass_is_empty(tmp_path):
    rng = np.random.default_rng(1)
    glass = np.clip(240 + rng.normal(0, 3, (512, 512, 3)), 0, 255).astype(np.uint8)
    mask, _ = tiles.tissue_mask(write_svs(tmp_path / "g.svs", glass, 0.5))
    assert mask.sum() == 0


def test_tile_grid_keeps_tissue_caps_and_is_deterministic(slide_file):
    path, img, region = slide_file
    mask, ds = tiles.tissue_mask(path)
    all_tiles = tiles.tile_grid(tiles.open_slide(path), mask, ds, 32, 0.5, 0, 0.5, seed=0)
    assert len(all_tiles) > 20
    for x, y in all_tiles:  # tiles of 64 level-0 px (32 at 0.5 um/px from a 0.25 um/px slide), 4 mask px:
        # a mask pixel of error on the edge moves the fraction by up to a quarter
        assert region[y:y + 64, x:x + 64].mean() >= 0.25
    assert not np.any((all_tiles % 64) != 0)
    capped = tiles.tile_grid(tiles.open_slide(path), mask, ds, 32, 0.5, 10, 0.5, seed=3)
    again = tiles.tile_grid(tiles.open_slide(path), mask, ds, 32, 0.5, 10, 0.5, seed=3)
    other = tiles.tile_grid(tiles.open_slide(path), mask, ds, 32, 0.5, 10, 0.5, seed=4)
    assert len(capped) == 10 and np.array_equal(capped, again) and not np.array_equal(capped, other)
    assert {tuple(c) for c in capped} <= {tuple(c) for c in all_tiles}


def test_read_tiles_reads_twice_the_region_at_half_the_resolution(slide_file):
    path, img, _ = slide_file
    coords = np.array([[0, 0], [640, 384], [128, 448]])
    batches = list(tiles.read_tiles(tiles.open_slide(path), coords, 32, 0.5, batch_size=2))
    assert [b.shape for b in batches] == [(2, 32, 32, 3), (1, 32, 32, 3)]
    got = np.concatenate(batches)
    for t, (x, y) in zip(got, coords):
        want = np.asarray(Image.fromarray(img[y:y + 64, x:x + 64]).resize((32, 32), Image.BILINEAR))
        assert np.abs(t.astype(int) - want.astype(int)).max() <= 2
    # at the slide's own mpp the tile is the level-0 pixels themselves
    same = next(tiles.read_tiles(tiles.open_slide(path), coords[1:2], 32, 0.25))[0]
    assert np.array_equal(same, img[384:416, 640:672])


def test_slide_without_mpp_names_the_file_and_the_fix(tmp_path):
    img, _ = synthetic(512, 512)
    path = write_svs(tmp_path / "nompp.svs", img, mpp=None)
    with pytest.raises(ValueError, match=r"nompp\.svs.*default mpp"):
        tiles.tile_slide(path, 32, 0.5, 10, 0.5, 0)
    assert len(tiles.tile_slide(path, 32, 0.5, 10, 0.5, 0, default_mpp=0.5)) == 10


def test_extract_features_shape_and_determinism(slide_file):
    import timm

    path, _, _ = slide_file
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    coords = np.array([[0, 0], [640, 384], [128, 448], [512, 512], [704, 320]])
    a = slidefeatures.extract_features(path, coords, net, 64, 0.5, batch_size=2, device="cpu")
    b = slidefeatures.extract_features(path, coords, net, 64, 0.5, batch_size=4, device="cpu")
    assert a.shape == (5, net.num_features) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a[0], a[1])  # glass and tissue differ


def test_feature_store_reads_one_bag(slide_file, tmp_path):
    import timm

    path, _, _ = slide_file
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    slides = [{"id": "SL_a", "path": path, "coords": np.array([[0, 0], [640, 384], [128, 448]])},
              {"id": "SL_b", "path": path, "coords": np.zeros((0, 2), np.int64)},
              {"id": "SL_c", "path": path, "coords": np.array([[512, 512], [704, 320]])}]
    kw = dict(backbone=net, tile_px=64, mpp=0.5, batch_size=2, device="cpu")
    slidefeatures.write_feature_store(tmp_path / "a.zarr", slides, **kw)
    slidefeatures.write_feature_store(tmp_path / "b.zarr", slides, **kw)
    store = slidefeatures.open_feature_store(tmp_path / "a.zarr")
    assert list(store.ids) == ["SL_a", "SL_b", "SL_c"]
    feats, coords = store.bag("SL_c")
    assert feats.shape == (2, net.num_features) and np.array_equal(coords, slides[2]["coords"])
    want = slidefeatures.extract_features(path, slides[2]["coords"], net, 64, 0.5, 2, "cpu")
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    assert store.bag(1)[0].shape == (0, net.num_features)
    files = sorted(p.relative_to(tmp_path / "a.zarr") for p in (tmp_path / "a.zarr").rglob("*") if p.is_file())
    for rel in files:  # same inputs, same bytes
        assert (tmp_path / "a.zarr" / rel).read_bytes() == (tmp_path / "b.zarr" / rel).read_bytes(), rel
