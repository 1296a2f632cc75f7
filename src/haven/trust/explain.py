"""Interpretability: Grad-CAM (a backbone stage) and Integrated Gradients (captum) maps for a
seeded sample of correct and wrong test images per class, and the model-randomization sanity check
(Adebayo et al. 2018): the mean Spearman rank correlation between the absolute maps of the trained
model and of the same architecture with re-initialized weights. Near 0 means the maps depend on
what the model learned; near 1 means they would look the same for any network (an edge detector,
not an explanation).
"""

from __future__ import annotations

import copy

import numpy as np


def gradcam_layer(model, stage: int = -1):
    """The backbone stage Grad-CAM hooks (default the last one, the last conv block)."""
    from haven.learn.models import backbone_stages

    return backbone_stages(model)[stage]


def attribution_maps(model, x, target, layer, ig_steps: int = 16, baseline=None, batch: int = 16):
    """(Grad-CAM maps (N, H, W), signed, upsampled to the input; Integrated Gradients maps (N, H, W),
    summed |attribution| over channels; IG convergence deltas (N,)).  Volumes (N, C, D, H, W) give
    (N, D, H, W) maps (Grad-CAM upsampled trilinearly).

    Grad-CAM is taken at ``layer`` for class ``target``; IG integrates from ``baseline``
    (default: a black image in the model's normalized units is the caller's job; zeros here).
    """
    import torch
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    model.eval()
    target = torch.as_tensor(target, dtype=torch.long)
    if baseline is None:
        baseline = torch.zeros_like(x[:1])
    spatial = tuple(x.shape[2:])
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    gc, ig, delta = [], [], []
    for i in range(0, len(x), batch):
        xb, tb = x[i:i + batch], target[i:i + batch]
        cam = LayerGradCam(model, layer).attribute(xb, target=tb, relu_attributions=False)
        cam = LayerAttribution.interpolate(cam, spatial, interpolate_mode=mode)
        gc.append(cam[:, 0].detach())
        a, d = IntegratedGradients(model).attribute(
            xb, baselines=baseline.expand_as(xb), target=tb, n_steps=ig_steps, internal_batch_size=64,
            return_convergence_delta=True)
        ig.append(a.detach().abs().sum(1))
        delta.append(d.detach())
    cat = (lambda v: torch.cat(v).cpu().numpy()) if gc else (lambda v: np.zeros((0,) + spatial))
    return cat(gc), cat(ig), (torch.cat(delta).cpu().numpy() if delta else np.zeros(0))


def randomized_copy(model, seed: int = 0):
    """The same architecture with every parameter and BatchNorm statistic re-initialized."""
    import torch

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
    return clone.eval()


def rank_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman correlation of paired maps (N, H, W); maps constant in either are left out."""
    from scipy.stats import spearmanr

    rhos = []
    for u, v in zip(a, b):
        u, v = u.ravel(), v.ravel()
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            continue
        rhos.append(spearmanr(u, v).statistic)
    return float(np.mean(rhos)) if rhos else float("nan")


def randomization_test(model, x, target, layer_fn=None, ig_steps: int = 16, baseline=None, seed: int = 0,
                       maps: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Model-randomization sanity check (Adebayo et al. 2018): Spearman correlation between the
    absolute maps of ``model`` and of :func:`randomized_copy` for the same images and targets (per
    method, mean over images; absolute values, so a map that only flips sign counts as unchanged).
    ``layer_fn(model)`` gives the Grad-CAM layer (default: the last backbone stage); ``maps`` =
    (Grad-CAM, IG) of ``model`` when already computed."""
    layer_fn = layer_fn or gradcam_layer
    if maps is None:
        gc, ig, _ = attribution_maps(model, x, target, layer_fn(model), ig_steps, baseline)
    else:
        gc, ig = maps
    rnd = randomized_copy(model, seed)
    gc_r, ig_r, _ = attribution_maps(rnd, x, target, layer_fn(rnd), ig_steps, baseline)
    return {"gradcam": rank_similarity(np.abs(gc), np.abs(gc_r)),
            "integrated_gradients": rank_similarity(np.abs(ig), np.abs(ig_r)),
            "n": int(len(x)), "randomization": "all weights and BatchNorm statistics re-initialized"}


def select_examples(y: np.ndarray, pred: np.ndarray, per_class: int, seed: int = 0) -> list[tuple[int, bool]]:
    """Seeded sample per true class: up to ``per_class`` correct and ``per_class`` wrong images,
    as (index, correct) in class order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        for correct in (True, False):
            idx = np.flatnonzero((y == c) & ((pred == y) == correct))
            for i in sorted(rng.permutation(idx)[:per_class]):
                chosen.append((int(i), correct))
    return chosen
