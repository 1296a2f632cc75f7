"""Prediction with a 3D model (model.pt ``dims: 3``): audited NIfTI volumes → one row per volume,
and for a segmentation a predicted mask per volume on the file's own grid.

A volume is fitted exactly as the training volumes were (nnU-Net's rule: prediction reuses the
training plans): :func:`haven.learn.volumestore.fit_volume` with the model's pixel settings
(spacing, size, mode, HU windows), nothing recomputed on the new file.  The scores come from
:func:`haven.learn.infer.logits_of`, the call validation and evaluation use (whole volumes for a
classifier, sliding windows of the training patch for a segmentation), a few volumes at a time.
Test-time augmentation is not applied to volumes: :mod:`haven.learn.tta`'s views are 2-D (a
"horizontal" flip of the last axis of a RAS volume would flip head and feet).

A segmentation's class map goes back onto the file's grid with
:func:`haven.learn.volumes.unfit_volume` (one nearest-neighbour resampling between the fitted and
the original affines) and is written as ``<file stem>.mask.nii.gz`` under the masks folder: uint8
class indices, the input's affine and its sform/qform codes, in a fresh header (no text copied
from the input's header: descrip, aux_file and extensions are where identifiers hide).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from haven.learn.volumestore import VOLUME_KINDS

log = logging.getLogger(__name__)

MASK_SUFFIX = ".mask.nii.gz"


def is_volume_model(meta: dict) -> bool:
    return int(meta.get("dims") or 2) == 3


def not_a_volume_model(name: str) -> str:
    """The message for a volume given to a 2-D model (the row's status, and the fix)."""
    return (f"{name} is a 3-D NIfTI volume but the model was trained on 2-D images or slices: predict "
            "volumes with a volume model (a project with preprocess.dims: 3), or leave NIfTI files out of "
            "this source")


def volume_params(meta: dict) -> dict:
    """The settings that fit a file into the model's input: the training run's ``pixels`` (mode,
    windows) with the volume's size [D, H, W] and spacing as model.pt records them."""
    pixels = dict(meta.get("pixels") or {})
    return {**pixels, "size": meta.get("size") or pixels["size"], "spacing": pixels.get("spacing") or meta["spacing"],
            "windows": pixels.get("windows") or []}


def fit(meta: dict, source, kind: str) -> tuple[np.ndarray, dict]:
    """One audited volume file → (uint8 (C, D, H, W) as the training store holds it, the info
    :func:`haven.learn.volumes.unfit_volume` maps a prediction back with).  ValueError naming the
    file and the fix for a file that is not a volume or cannot be read."""
    from haven.learn.volumestore import fit_volume

    if not isinstance(source, (str, Path)):
        return _fit_bytes(meta, source.read() if hasattr(source, "read") else bytes(source), kind)
    name = Path(source).name
    if kind not in VOLUME_KINDS:
        raise ValueError(f"{name} is a 2-D {kind} file but the model is a 3-D volume model: predict it with a "
                         "model trained on 2-D images (preprocess.dims: 2), or give this model NIfTI volumes")
    stored, _, info = fit_volume(source, None, volume_params(meta))
    return stored, json.loads(info)


def _fit_bytes(meta: dict, data: bytes, kind: str) -> tuple[np.ndarray, dict]:
    """A volume sent as bytes (the registered package's requests): MONAI's loader reads files, so
    the bytes lie for the fit in a private temporary folder (mode 0700) that is removed at once."""
    import tempfile

    suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory(prefix="haven-volume-") as tmp:
        path = Path(tmp) / f"volume{suffix}"
        path.write_bytes(data)
        return fit(meta, path, kind)


def example_volume(meta: dict) -> bytes:
    """A small real NIfTI (gzip) on the model's grid and spacing, a smooth ramp: the input example
    the registered package is logged with."""
    import nibabel as nib

    size = [int(v) for v in meta["size"]]
    spacing = [float(v) for v in meta.get("spacing") or [1.0, 1.0, 1.0]]
    ramp = np.add.outer(np.add.outer(np.arange(size[0]), np.arange(size[1])), np.arange(size[2])).astype(np.float32)
    img = nib.Nifti1Image((100 + ramp).astype(np.int16), np.diag(spacing + [1.0]))
    return _gz(img)


def scores(bundle, samples: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 (N, C, D, H, W) → the task's scores: (N, K) for a classifier, (N, K, D, H, W) for a
    segmentation, :data:`haven.learn.infer.VOLUME_BATCH` volumes (or fewer) at a time."""
    import torch

    from haven.learn.data import normalize
    from haven.learn.infer import VOLUME_BATCH, logits_of

    mean = torch.tensor(bundle.meta["mean"], dtype=torch.float32)
    std = torch.tensor(bundle.meta["std"], dtype=torch.float32)
    task, patch, out = bundle.task, bundle.meta.get("patch"), []
    step = max(1, min(int(batch_size), VOLUME_BATCH))
    with torch.inference_mode():
        for i in range(0, len(samples), step):
            x = normalize(torch.from_numpy(np.ascontiguousarray(samples[i:i + step])), mean, std)
            out.append(task.scores(logits_of(bundle.model, x, "off", patch)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(bundle.classes)), np.float32)


def mask_path(file: str) -> str:
    """``<shard>/<patient>/.../<stem>.mask.nii.gz`` of an audited volume's relative path."""
    for suffix in (".nii.gz", ".nii"):
        if file.endswith(suffix):
            return file[: -len(suffix)] + MASK_SUFFIX
    return file + MASK_SUFFIX


def write_mask(pred: np.ndarray, info: dict, file: str, data_dir: Path, out_dir: Path) -> str:
    """One predicted class map (D, H, W) at the model's size → the NIfTI on the file's own grid;
    returns its path relative to ``out_dir``."""
    import nibabel as nib

    from haven.io import atomic_write_bytes
    from haven.learn.volumes import unfit_volume

    full = unfit_volume(pred, info)
    affine = np.asarray(info["affine"], float)
    source = nib.load(str(Path(data_dir) / file))  # the header only: the codes of the input's world
    img = nib.Nifti1Image(full, affine)
    img.header.set_intent("label")
    img.set_sform(affine, code=int(source.header["sform_code"]) or 1)
    img.set_qform(affine, code=int(source.header["qform_code"]) or 1)
    rel = mask_path(file)
    target = Path(out_dir) / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, img.to_bytes() if not rel.endswith(".gz") else _gz(img))
    return rel


def _gz(img) -> bytes:
    """The image as .nii.gz bytes, deterministic (no time stamp in the gzip header)."""
    import gzip

    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _fit_one(meta: dict, path: Path, kind: str):
    """(sample, info, "ok") or (None, None, the reason) of one file (run in a worker thread)."""
    from haven.sources import reason

    try:
        sample, info = fit(meta, path, kind)
        return sample, info, "ok"
    except Exception as e:  # named in the table by its pseudonymous file, never stopping the cohort
        return None, None, f"not decoded: {reason(e, path)}"


def run(rows, data_dir: Path, bundle, *, batch_size: int, workers: int, masks: Path | None
        ) -> tuple[list[dict], list[str]]:
    """The bundle's row and status of each manifest row (``rows``: the sample rows, ``file`` and
    ``kind``), volumes fitted by ``workers`` threads ahead of the network; a segmentation's masks
    written to ``masks`` (each row names its file, ``mask_files``)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from haven.progress import progress

    files, kinds = list(rows["file"]), list(rows["kind"])
    out: list[dict] = [{} for _ in files]
    status = ["ok"] * len(files)
    step = max(1, min(int(batch_size), _volume_batch()))
    paths = [Path(data_dir) / f for f in files]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            progress("predict", len(files), log=log, unit="volumes") as bar:
        # a bounded look-ahead, not pool.map: a cohort's fitted volumes are never all held at once
        ahead = deque(pool.submit(_fit_one, bundle.meta, paths[i], kinds[i])
                      for i in range(min(len(files), step + workers)))
        batch: list[tuple[int, np.ndarray, dict]] = []
        for i in range(len(files)):
            sample, info, status[i] = ahead.popleft().result()
            if i + len(ahead) + 1 < len(files):
                j = i + len(ahead) + 1
                ahead.append(pool.submit(_fit_one, bundle.meta, paths[j], kinds[j]))
            if sample is None:
                log.warning("%s: %s", files[i], status[i])
            else:
                batch.append((i, sample, info))
            if batch and (len(batch) == step or i == len(files) - 1):
                _score(batch, bundle, files, Path(data_dir), masks, out)
                batch = []
            bar.update(1)
    return out, status


def _volume_batch() -> int:
    from haven.learn.infer import VOLUME_BATCH

    return VOLUME_BATCH


def _score(batch, bundle, files: list[str], data_dir: Path, masks: Path | None, out: list[dict]) -> None:
    """One batch of fitted volumes → their rows in ``out`` (and masks written)."""
    from haven.sources import reason

    table_rows, predicted = bundle.outputs(np.stack([s for _, s, _ in batch]))
    for k, ((i, _, info), row) in enumerate(zip(batch, table_rows)):
        out[i] = row
        if predicted is None or masks is None:
            continue
        try:
            out[i]["mask_files"] = write_mask(predicted[k], info, files[i], data_dir, Path(masks))
        except Exception as e:  # the row keeps its prediction; the mask's failure is named, the cohort goes on
            log.warning("%s: mask not written: %s", files[i], reason(e, data_dir / files[i]))
            out[i]["mask_files"] = ""
