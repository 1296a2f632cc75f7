"""Small trained-model files for the tests of applying a model (haven.predict): a ``model.pt`` in the
train stage's format and an evaluate ``metrics.json``, made in seconds rather than by the DAG.

``ct_bundle``: a 3-window CT model (classes normal/hemorrhage, slab 0), applied to pydicom's
``CT_small.dcm`` and copies; ``gray_bundle``: a 10-class gray image model (digits-like).  The
weights are seeded random plus a fitted bias, so the outputs differ between inputs (equality
tests can fail) but nothing here claims accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CT_WINDOWS = [{"center": 40, "width": 80}, {"center": 80, "width": 200}, {"center": 600, "width": 2800}]


def write_bundle(folder: Path, *, classes: list[str], pixels: dict, in_chans: int, backbone: str = "resnet18",
                 temperature: float | None = 1.5, threshold: float | None = 0.4, seed: int = 0) -> tuple[Path, Path]:
    """``folder/train/model.pt`` and ``folder/evaluate/metrics.json``; returns their paths."""
    from haven.learn.models import build_model

    torch.manual_seed(seed)
    model = build_model(backbone, len(classes), weights=None, in_chans=in_chans)
    model.eval()
    model_pt = folder / "train" / "model.pt"
    metrics = folder / "evaluate" / "metrics.json"
    model_pt.parent.mkdir(parents=True, exist_ok=True)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "backbone": backbone, "classes": classes, "in_chans": in_chans,
                "size": pixels["size"], "mean": [0.3] * in_chans, "std": [0.25] * in_chans, "hparams": {},
                "best_epoch": 1, "task": "classification", "pixels": pixels}, model_pt)
    decision = {"rule": "argmax", "positive": classes[-1], "threshold": None, "chosen_on": None,
                "calibrated": temperature is not None}
    if threshold is not None and len(classes) == 2:
        decision.update(rule="threshold", threshold=threshold, chosen_on="val", criterion="youden", val_n=10)
    metrics.write_text(json.dumps({"n": 10, "accuracy": 0.5, "balanced_accuracy": 0.5, "classes": classes,
                                   "roc_auc": 0.5, "calibration": {"temperature": temperature},
                                   "decision": decision}))
    return model_pt, metrics


def ct_bundle(folder: Path, **kw) -> tuple[Path, Path]:
    pixels = {"size": 32, "mode": "ct", "windows": CT_WINDOWS, "slab": 0}
    return write_bundle(folder, classes=["hemorrhage", "normal"][::-1], pixels=pixels, in_chans=3, **kw)


def gray_bundle(folder: Path, **kw) -> tuple[Path, Path]:
    pixels = {"size": 32, "mode": "gray", "windows": CT_WINDOWS, "slab": 0}
    return write_bundle(folder, classes=[str(i) for i in range(10)], pixels=pixels, in_chans=1, threshold=None, **kw)


def ct_files(folder: Path, n: int = 4) -> list[Path]:
    """``n`` DICOM CT files (pydicom's CT_small.dcm with different pixels and patients), PHI planted."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        arr = ds.pixel_array.astype(np.int16)
        ds.PixelData = np.clip(arr + rng.integers(-200, 200, arr.shape), -1000, 3000).astype(arr.dtype).tobytes()
        ds.PatientName = f"Doe^Jane{i}"
        ds.PatientID = f"HOSP99{i:04d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"ACC{i:06d}"
        path = folder / f"ct{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def gray_files(folder: Path, n: int = 4) -> list[Path]:
    """``n`` 8-bit gray PNGs of scikit-learn's digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    images = load_digits().images[:n]
    out = []
    for i, im in enumerate(images):
        path = folder / f"digit{i}.png"
        Image.fromarray(np.rint(im * 255 / 16).astype(np.uint8)).resize((32, 32)).save(path)
        out.append(path)
    return out
