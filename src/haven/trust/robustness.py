"""Adversarial robustness: accuracy under FGSM and PGD (L-inf, the Adversarial Robustness
Toolbox, ART) on a seeded, class-stratified subsample, with Wilson intervals. Epsilons are in the
units of the network input; the evaluate stage attacks the *normalized* input and bounds it by the
image range per channel.
"""

from __future__ import annotations

import logging

import numpy as np


def stratified_subsample(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` indices, classes taken in turn from seeded permutations (sorted)."""
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    out: list[int] = []
    while len(out) < n:
        for p in pools:
            if p and len(out) < n:
                out.append(int(p.pop()))
    return np.sort(np.array(out))


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score interval of a proportion k / n."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [float(max(0.0, c - h)), float(min(1.0, c + h))]


def robustness(model, x: np.ndarray, y: np.ndarray, epsilons: list[float], clip_min, clip_max,
               pgd_steps: int = 10, batch_size: int = 64) -> dict:
    """Accuracy under untargeted L-inf FGSM and PGD (ART) for each epsilon, in the units of ``x``.

    ``x`` is the network input (N, C, H, W) float32; ``clip_min``/``clip_max`` bound every
    feature (arrays broadcastable to one sample, e.g. (C, 1, 1)). PGD: ``pgd_steps`` steps of
    2.5 * eps / steps from the clean image (no random start), projected onto the eps-ball and
    the clip range; at eps = 0 the ball is a point and PGD runs a single (null) step.

    Robust accuracy counts an image as robust at eps when the attack did not change its
    prediction away from the true label. As in AutoAttack, only images still robust are attacked:
    misclassified clean images count as broken at every eps, and an image broken at a smaller
    eps is broken at every larger one (its adversarial example lies inside the larger ball), so
    epsilons are attacked in increasing order and the curve is monotone. Wilson 95 % intervals.
    """
    import torch
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.WARNING)  # its per-attack "success rate" is not ours
    dev = next(model.parameters()).device
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    clf = PyTorchClassifier(model=model.eval(), loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=int(model_classes(model, x)),
                            clip_values=(np.asarray(clip_min, np.float32), np.asarray(clip_max, np.float32)),
                            device_type="gpu" if dev.type == "cuda" else "cpu")
    clean = clf.predict(x, batch_size=batch_size).argmax(1) == y if len(y) else np.zeros(0, bool)
    order = sorted(range(len(epsilons)), key=lambda i: float(epsilons[i]))
    out = {"n": int(len(y)), "clean_accuracy": float(clean.mean()) if len(y) else None,
           "epsilons": [float(e) for e in epsilons], "pgd_steps": int(pgd_steps)}
    for attack in ("fgsm", "pgd"):
        robust = clean.copy()
        acc: list[float | None] = [None] * len(epsilons)
        ci: list = [None] * len(epsilons)
        for i in order:
            eps = float(epsilons[i])
            todo = np.flatnonzero(robust)
            if len(todo):
                if attack == "fgsm":
                    atk = FastGradientMethod(clf, norm=np.inf, eps=eps, eps_step=max(eps, 1e-6), batch_size=batch_size)
                else:
                    atk = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=max(2.5 * eps / pgd_steps, 1e-6),
                                                   max_iter=pgd_steps if eps > 0 else 1, num_random_init=0,
                                                   batch_size=batch_size, verbose=False)
                adv = atk.generate(x[todo], y=y[todo])
                robust[todo] = clf.predict(adv, batch_size=batch_size).argmax(1) == y[todo]
            acc[i] = float(robust.mean()) if len(y) else None
            ci[i] = wilson(int(robust.sum()), len(y))
        out[attack], out[f"{attack}_ci"] = acc, ci
    return out


def model_classes(model, x) -> int:
    import torch

    with torch.no_grad():
        dev = next(model.parameters()).device
        return int(model(torch.as_tensor(np.asarray(x[:1], np.float32), device=dev)).shape[1])
