"""3D networks for a volume project (a store with ``dims: 3``): MONAI classifiers and U-Nets, the
training patch, and the validation pass (whole volumes for classification, MONAI
``sliding_window_inference`` over patch-sized windows for segmentation).

Why trained from scratch: no 3D ImageNet-like weights ship offline (MONAI's MedicalNet/Model Zoo
weights are downloads), so ``model.weights`` must be null and a volume project has no pretrained
backbone to protect.  The transfer-learning schedule of :mod:`haven.learn.train` is therefore
skipped in 3D (:func:`from_scratch`): no frozen-backbone epochs (a head on random features learns
nothing worth the epochs) and one learning rate for every layer (``backbone_lr_factor`` would only
slow the random backbone).  The networks still name a ``head`` (``haven_head_name`` of a
classifier: its last ``Linear``; a U-Net's ``haven_head``: its last up-sampling block) so that
:func:`haven.learn.models.backbone_and_head` splits them like the 2D models.

``backbone`` names (``monai:`` may be given or not):

* classification: ``densenet121`` / ``densenet169`` / ``densenet201`` (MONAI DenseNet),
  ``resnet10`` / ``resnet18`` / ``resnet34`` / ``resnet50`` (MONAI ResNet, MedicalNet layout),
  ``densenet_tiny`` (two small dense blocks: CPU demos and tests);
* segmentation: ``unet`` (MONAI UNet, 16-32-64-128-256 channels, 2 residual units),
  ``unet_small`` (16-32-64-128), ``unet_tiny`` (8-16-32: tests).

Axes: the store's (D, H, W) are RAS x, y, z (:mod:`haven.learn.volumes`), so D is left-right.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from haven.learn.data import ZarrSplit, normalize, store_dims
from haven.learn.infer import autocast, sliding_window  # one sliding-window call for validation and prediction

CLASSIFIERS = ("densenet121", "densenet169", "densenet201", "densenet_tiny",
               "resnet10", "resnet18", "resnet34", "resnet50")
# name → (channels, strides, residual units); the input side must be a multiple of prod(strides)
UNETS = {"unet": ((16, 32, 64, 128, 256), (2, 2, 2, 2), 2),
         "unet_small": ((16, 32, 64, 128), (2, 2, 2), 2),
         "unet_tiny": ((8, 16, 32), (2, 2), 1)}
# the largest training patch side when the project sets none (a 96^3 batch of 4 fits a small GPU)
DEFAULT_PATCH = 96


def _name(backbone: str, known, kind: str) -> str:
    name = str(backbone).strip().removeprefix("monai:")
    if name not in known:
        raise ValueError(f"model.backbone {backbone!r} is not a 3D {kind} network; a volume project "
                         f"(preprocess.dims: 3) takes one of {', '.join(known)}")
    return name


def _no_weights(weights) -> None:
    if weights is not None and str(weights).lower() != "none":
        raise ValueError(f"model.weights {weights!r}: no pretrained 3D weights are available offline; a volume "
                         "project (preprocess.dims: 3) trains from scratch: set model.weights: null")


def build_classifier3d(backbone: str, classes: int, weights=None, in_chans: int = 1) -> nn.Module:
    """A MONAI 3D classifier giving ``(N, classes)`` logits for ``(N, in_chans, D, H, W)`` input
    of any size (global pooling before the head)."""
    from monai.networks import nets

    _no_weights(weights)
    name = _name(backbone, CLASSIFIERS, "classification")
    if name == "densenet_tiny":
        net = nets.DenseNet(spatial_dims=3, in_channels=in_chans, out_channels=classes, init_features=16,
                            growth_rate=8, block_config=(2, 2), bn_size=2)
    elif name.startswith("densenet"):
        net = getattr(nets, name.replace("densenet", "DenseNet"))(spatial_dims=3, in_channels=in_chans,
                                                                   out_channels=classes)
    else:
        net = getattr(nets, name)(spatial_dims=3, n_input_channels=in_chans, num_classes=classes)
    net.haven_head_name = "class_layers.out" if name.startswith("densenet") else "fc"
    net.haven_info = {"backbone": backbone, "arch": name, "family": "monai", "in_chans": in_chans,
                      "weights": None, "source": None, "dims": 3}
    return net


def build_unet3d(backbone: str, classes: int, weights=None, in_chans: int = 1) -> nn.Module:
    """A MONAI 3D U-Net giving ``(N, classes, D, H, W)`` logits (``classes`` counts the background)."""
    from monai.networks.nets import UNet

    _no_weights(weights)
    if classes < 2:
        raise ValueError(f"a segmentation model needs >= 2 classes (background and a structure), got {classes}")
    name = _name(backbone, UNETS, "segmentation")
    channels, strides, units = UNETS[name]
    net = UNet(spatial_dims=3, in_channels=in_chans, out_channels=classes, channels=channels, strides=strides,
               num_res_units=units)
    # the "head": the last up-sampling block (it maps to the classes); held outside the module tree so
    # the state dict has no duplicate keys (as haven.learn.segnet's U-Net)
    object.__setattr__(net, "haven_head", net.model[-1])
    net.haven_info = {"backbone": backbone, "arch": name, "family": "monai", "in_chans": in_chans,
                      "weights": None, "source": None, "dims": 3, "architecture": "unet", "classes": classes,
                      "multiple": int(np.prod(strides))}
    return net


def from_scratch(split: ZarrSplit) -> bool:
    """Whether the split trains a 3D network (no pretrained weights: no frozen phase, one lr)."""
    return store_dims(split) == 3


def patch_size(split: ZarrSplit, hp: dict, multiple: int = 16) -> list[int]:
    """The training patch [D, H, W], also the sliding-window roi: ``train.patch`` (a side or three)
    when set, else each side of the volume up to :data:`DEFAULT_PATCH`, never above the volume.
    A patch smaller than the volume is rounded down to a multiple of ``multiple`` (a U-Net's)."""
    size = [int(s) for s in split.images.shape[-3:]]
    want = hp.get("patch")
    want = [int(want)] * 3 if isinstance(want, (int, float)) else [int(s) for s in (want or [DEFAULT_PATCH] * 3)]
    out = []
    for s, w in zip(size, want):
        p = min(s, w)
        out.append(max(multiple, p - p % multiple) if p < s else p)
    return out


def train_patch(model: nn.Module, split: ZarrSplit, hp: dict) -> list[int] | None:
    """The random patch a training batch of volumes is cut to (None: slices, or whole volumes).  A
    segmentation trains on patches (:func:`patch_size`); a classifier on whole volumes unless
    ``train.patch`` is set (a random patch may miss what the label is about)."""
    if store_dims(split) != 3 or (split.targets != "masks" and not hp.get("patch")):
        return None
    return patch_size(split, hp, int(getattr(model, "haven_info", {}).get("multiple", 16)))


def random_patches(x: torch.Tensor, y: torch.Tensor | None, patch: list[int] | None, generator: torch.Generator,
                   pos_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random ``patch`` per volume of ``x`` (N, C, D, H, W) and the same box of its mask
    ``y`` (N, D, H, W).  With masks, ``pos_fraction`` of the patches are centred on a random
    foreground voxel (MONAI RandCropByPosNegLabel's balance: a small lesion is then seen at all);
    the others lie anywhere.  A patch as large as the volume (or None) returns it unchanged."""
    size = list(x.shape[-3:])
    if patch is None or list(patch) == size:
        return x, y
    xs, ys = [], []
    for i in range(len(x)):
        u = torch.rand(4, generator=generator)
        fg = torch.nonzero(y[i]) if y is not None and float(u[0]) < pos_fraction else None
        if fg is not None and len(fg):
            centre = fg[int(u[1] * len(fg)) % len(fg)].tolist()
            start = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, patch, size)]
        else:
            start = [int(float(v) * (s - p + 1)) for v, p, s in zip(u[1:], patch, size)]
        box = tuple(slice(a, a + p) for a, p in zip(start, patch))
        xs.append(x[(i, slice(None)) + box])
        if y is not None:
            ys.append(y[(i,) + box])
    return torch.stack(xs), (torch.stack(ys) if y is not None else None)


@torch.no_grad()
def validate3d(model: nn.Module, split: ZarrSplit, task, hp: dict) -> dict:
    """The validation metrics of a 3D model: a classifier sees whole volumes (its head pools
    globally); a segmentation goes through MONAI ``sliding_window_inference`` with the training
    patch as roi, and its Dice and loss are pooled over the split as they stream by (no split's
    probabilities held at once)."""
    dev = next(model.parameters()).device
    model.eval()
    batch = max(1, int(hp["batch_size"]))
    if split.targets != "masks":
        scores, labels = [], []
        for x, y in split.batches(batch, shuffle=False):
            with autocast(dev, hp["amp"]):
                logits = model(normalize(x.to(dev), split.mean, split.std))
            scores.append(task.scores(logits).cpu().numpy())
            labels.append(y.numpy())
        return task.val_metrics(np.concatenate(labels), np.concatenate(scores)) if scores else {}
    return _segmentation_metrics(model, split, task, hp, dev, batch)


def _segmentation_metrics(model, split, task, hp, dev, batch) -> dict:
    roi = patch_size(split, hp, int(getattr(model, "haven_info", {}).get("multiple", 16)))
    k = len(split.classes)
    inter, denom = np.zeros(k), np.zeros(k)
    nll, voxels = 0.0, 0
    for x, y in split.batches(batch, shuffle=False):
        logits = sliding_window(model, normalize(x.to(dev), split.mean, split.std), roi, hp["amp"], batch)
        scores = task.scores(logits).cpu()
        t = y.long()
        nll -= float(torch.log(scores.gather(1, t[:, None]).clamp_min(1e-12)).sum())
        voxels += t.numel()
        pred = scores.argmax(1)
        for c in range(1, k):
            inter[c] += float(((pred == c) & (t == c)).sum())
            denom[c] += float((pred == c).sum() + (t == c).sum())
    if not voxels:
        return {}
    # pooled Dice per foreground class (Segmentation.val_metrics' definition, summed as it streams)
    dice = [2 * inter[c] / denom[c] for c in range(1, k) if denom[c] > 0]
    return {"val_loss": nll / voxels, "val_dice": float(np.mean(dice)) if dice else 0.0}
