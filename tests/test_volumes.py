"""One NIfTI volume → the 3D model's array (haven.learn.volumes): orientation, spacing, intensity,
crop/pad, the mask on its image, the way back onto the file's grid, and bad files by name."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from haven.learn.volumes import load_volume, unfit_volume

MNI = Path(nib.__file__).parents[1] / "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
WINDOWS = [{"center": 40, "width": 80}, {"center": 400, "width": 1800}]


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _affine(spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _lps_twin(data: np.ndarray, affine: np.ndarray):
    """The same voxels in the same places of the world, stored left-to-right and
    anterior-to-posterior flipped (LPS), as a DICOM converter may write them."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    return data[::-1, ::-1].copy(), affine @ flip


def _head(shape=(48, 44, 40)) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'head' (100) with a bright cube (400) off-centre, zero outside; and the cube's mask."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, np.float32) - 1) / 2
    r = ((grid - centre[:, None, None, None]) / (np.array(shape) * 0.42)[:, None, None, None]) ** 2
    data = np.where(r.sum(0) <= 1, 100.0, 0.0).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[14:26, 12:22, 16:28] = 1
    data[mask == 1] = 400.0
    return data, mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_lps_and_ras_twins_give_the_same_output(tmp_path):
    data, mask = _head()
    aff = _affine((1.2, 0.9, 1.5), (-20.0, 10.0, 5.0))
    ras = _save(tmp_path / "ras.nii.gz", data, aff)
    ras_m = _save(tmp_path / "ras_mask.nii.gz", mask, aff)
    lps_data, lps_aff = _lps_twin(data, aff)
    lps = _save(tmp_path / "lps.nii.gz", lps_data, lps_aff)
    lps_m = _save(tmp_path / "lps_mask.nii.gz", _lps_twin(mask, aff)[0], lps_aff)
    kw = dict(spacing_mm=2.0, size=32, mode="mr", windows=[])
    a, am, ainfo = load_volume(ras, ras_m, **kw)
    b, bm, binfo = load_volume(lps, lps_m, **kw)
    assert (ainfo["axcodes"], binfo["axcodes"]) == (["R", "A", "S"], ["L", "P", "S"])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.array_equal(am, bm)
    assert am.sum() > 0


def test_spacing_is_respected_before_pad_or_crop(tmp_path):
    cube = np.ones((40, 40, 20), np.float32)
    path = _save(tmp_path / "v.nii.gz", cube, _affine((1.0, 1.0, 2.0)))
    _, _, info = load_volume(path, spacing_mm=2.0, size=16, mode="mr", windows=[])
    # 1 mm x 40 → 20 voxels at 2 mm (half); the 2 mm axis keeps its 20
    assert info["resampled_shape"] == [20, 20, 20]
    assert info["spacing"] == [1.0, 1.0, 2.0]
    _, _, info = load_volume(path, spacing_mm=[4.0, 2.0, 1.0], size=16, mode="mr", windows=[])
    # MONAI spans the voxel centres: (n - 1) x old / new + 1 voxels, rounded (39 / 4 + 1 → 11, 19 x 2 + 1 = 39)
    assert info["resampled_shape"] == [11, 20, 39]


def test_output_shape_is_size_and_types(tmp_path):
    data, mask = _head()
    aff = _affine((1.0, 1.0, 1.0))
    img, m, info = load_volume(_save(tmp_path / "v.nii.gz", data, aff), _save(tmp_path / "m.nii.gz", mask, aff),
                               spacing_mm=1.0, size=[32, 24, 56], mode="mr", windows=[])
    assert img.shape == (1, 32, 24, 56) and img.dtype == np.float32
    assert m.shape == (32, 24, 56) and m.dtype == np.uint8
    assert 0.0 <= img.min() and img.max() <= 1.0
    box = info["box"]
    assert [e - s for s, e in zip(box["start"], box["end"])] == [32, 24, 56]
    assert box["start"][2] < 0  # the 56 axis is padded (the head is 40 long), the others cropped
    assert box["start"][0] > 0 and box["start"][1] > 0
    again, m2, _ = load_volume(tmp_path / "v.nii.gz", tmp_path / "m.nii.gz", spacing_mm=1.0, size=[32, 24, 56],
                               mode="mr", windows=[])
    assert again.tobytes() == img.tobytes() and m2.tobytes() == m.tobytes()  # same file → same bytes


def test_mask_lands_on_the_bright_cube(tmp_path):
    data, mask = _head()
    lps_data, lps_aff = _lps_twin(data, _affine((1.2, 0.9, 1.5), (3.0, -7.0, 11.0)))
    img, m, _ = load_volume(_save(tmp_path / "v.nii.gz", lps_data, lps_aff),
                            _save(tmp_path / "m.nii.gz", _lps_twin(mask, lps_aff)[0], lps_aff),
                            spacing_mm=2.0, size=[20, 24, 28], mode="mr", windows=[])
    assert set(np.unique(m)) == {0, 1}
    bright = img[0] >= 0.999  # the cube's interior is the top percentile
    assert bright.sum() > 0 and m[bright].all()
    inside, outside = img[0][m == 1], img[0][(m == 0) & (img[0] > 0)]
    # the edges are blended by the bilinear resampling, but no mask voxel lies off the cube
    assert inside.min() > 0.5 and np.median(inside) > 0.95 and outside.max() < 0.9
    assert _dice(img[0] > 0.6, m) > 0.9
    np.testing.assert_allclose(np.argwhere(m).mean(0), np.argwhere(img[0] > 0.6).mean(0), atol=0.5)


def test_ct_windows_give_the_expected_channels(tmp_path):
    hu = np.full((40, 40, 40), -1000.0, np.float32)  # air
    labels = np.zeros(hu.shape, np.uint8)
    hu[5:35, 5:35, 5:35] = 0.0
    for k, (value, z) in enumerate([(0.0, 6), (40.0, 16), (1000.0, 26)], start=1):
        hu[10:30, 10:30, z:z + 8] = value
        labels[12:28, 12:28, z + 2:z + 6] = k  # interiors, away from any interpolated edge
    aff = _affine((1.0, 1.0, 1.0))
    img, m, _ = load_volume(_save(tmp_path / "ct.nii.gz", hu, aff), _save(tmp_path / "lab.nii.gz", labels, aff),
                            spacing_mm=1.0, size=32, mode="ct", windows=WINDOWS)
    assert img.shape == (2, 32, 32, 32)
    expected = {1: (0.0, 500 / 1800), 2: (0.5, 540 / 1800), 3: (1.0, 1500 / 1800)}
    for k, (brain, bone) in expected.items():
        np.testing.assert_allclose(img[0][m == k], brain, atol=1e-4)
        np.testing.assert_allclose(img[1][m == k], bone, atol=1e-4)
    # air is 0 in every window, so the foreground crop kept the body (30 voxels) and padded it to 32
    assert img[:, 0].max() == 0.0 and img[1, 1:31, 1:31, 1:31].min() > 0.27


def test_round_trip_maps_a_mask_back_onto_the_original_grid(tmp_path):
    shape = (64, 60, 48)
    grid = np.indices(shape).astype(np.float32)
    sphere = (((grid - np.array([30.0, 28.0, 22.0])[:, None, None, None]) ** 2).sum(0) <= 15 ** 2).astype(np.uint8)
    data = np.where(sphere, 300.0, 50.0).astype(np.float32)
    data[:4] = 0.0  # something for the foreground crop to cut
    lps_data, lps_aff = _lps_twin(data, _affine((1.0, 1.0, 1.2), (5.0, 5.0, 5.0)))
    lps_mask = _lps_twin(sphere, lps_aff)[0]
    _, m, info = load_volume(_save(tmp_path / "v.nii.gz", lps_data, lps_aff),
                             _save(tmp_path / "m.nii.gz", lps_mask, lps_aff),
                             spacing_mm=1.5, size=48, mode="mr", windows=[])
    back = unfit_volume(m, info)
    assert back.shape == shape and back.dtype == np.uint8
    assert _dice(back, lps_mask) > 0.95
    # at the file's own spacing the way back is exact, through the reorientation and crop/pad
    _, m, info = load_volume(tmp_path / "v.nii.gz", tmp_path / "m.nii.gz", spacing_mm=[1.0, 1.0, 1.2],
                             size=[40, 48, 56], mode="mr", windows=[])
    assert np.array_equal(unfit_volume(m, info), lps_mask)
    with pytest.raises(ValueError, match="does not fit"):
        unfit_volume(m[:-1], info)


def test_mni_template_downsampled():
    img, _, info = load_volume(MNI, spacing_mm=4.0, size=48, mode="mr", windows=[])
    assert img.shape == (1, 48, 48, 48)
    assert info["shape"] == [197, 233, 189] and info["axcodes"] == ["R", "A", "S"]
    assert info["resampled_shape"] == [50, 59, 48]
    brain = img[0] > 0
    # the skull-stripped brain, cropped to itself: a good part of the box, well spread in [0, 1]
    assert 0.25 < brain.mean() < 0.6
    p10, p50, p90 = np.percentile(img[0][brain], [10, 50, 90])
    assert p90 - p10 > 0.35 and 0.4 < p50 < 0.9
    back = unfit_volume(brain.astype(np.uint8), info)
    truth = np.asarray(nib.load(str(MNI)).dataobj) > 0
    assert back.shape == truth.shape and _dice(back, truth) > 0.9


def _truncated(tmp_path):
    good = _save(tmp_path / "good.nii.gz", np.random.default_rng(0).random((30, 30, 30), np.float32),
                 _affine((1, 1, 1)))
    raw = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


@pytest.mark.parametrize("case, pattern", [
    ("truncated", "damaged or truncated"),
    ("not_nifti", "not a readable NIfTI"),
    ("two_d", "one 3-D volume is expected"),
    ("four_d", "split a 4-D series"),
])
def test_bad_files_are_named_with_the_fix(tmp_path, case, pattern):
    if case == "truncated":
        path = _truncated(tmp_path)
    elif case == "not_nifti":
        path = tmp_path / "notes.nii.gz"
        path.write_bytes(gzip.compress(b"patient notes, not an image\n" * 50))
    elif case == "two_d":
        path = _save(tmp_path / "slice.nii.gz", np.ones((30, 30), np.float32), _affine((1, 1, 1)))
    else:
        path = _save(tmp_path / "series.nii.gz", np.ones((10, 10, 10, 3), np.float32), _affine((1, 1, 1)))
    with pytest.raises(ValueError, match=pattern) as e:
        load_volume(path, spacing_mm=2.0, size=16, mode="mr", windows=[])
    assert path.name in str(e.value)


def test_a_mask_on_another_grid_is_refused(tmp_path):
    img = _save(tmp_path / "v.nii.gz", np.ones((20, 20, 20), np.float32), _affine((1, 1, 1)))
    mask = _save(tmp_path / "m.nii.gz", np.ones((20, 20, 20), np.uint8), _affine((2, 1, 1)))
    with pytest.raises(ValueError, match="image's voxel grid") as e:
        load_volume(img, mask, spacing_mm=2.0, size=16, mode="mr", windows=[])
    assert "m.nii.gz" in str(e.value)


def test_a_single_volume_4d_file_and_bad_settings(tmp_path):
    path = _save(tmp_path / "one.nii.gz", np.ones((20, 20, 20, 1), np.float32), _affine((1, 1, 1)))
    img, _, info = load_volume(path, spacing_mm=1.0, size=16, mode="mr", windows=[])
    assert img.shape == (1, 16, 16, 16) and info["shape"] == [20, 20, 20]
    with pytest.raises(ValueError, match="mode 'mr' or 'ct'"):
        load_volume(path, spacing_mm=1.0, size=16, mode="rgb", windows=[])
    with pytest.raises(ValueError, match="HU window"):
        load_volume(path, spacing_mm=1.0, size=16, mode="ct", windows=[])
