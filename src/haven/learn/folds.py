"""Cross-validation folds at patient level: the train split's patients in K folds, one Zarr store each.

Why stores and not an index: a fold's training reads the other K-1 stores as one split
(:class:`haven.learn.data.ZarrSplit` of several stores) by whole chunks, as any split is read, and
every sample is stored once (the folds are disjoint), so the train split is copied once, without
decoding anything again.  The folds keep the train split's normalization statistics (mean/std):
the test and validation splits, which no fold trains on, are normalized with the same ones.

Patients are kept whole (every image of a patient in one fold) and the folds are stratified by
label (scikit-learn's ``StratifiedGroupKFold``, seeded; for several findings per sample by their
combination), so each fold's validation resembles the others'.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from haven.io import atomic_write_text

log = logging.getLogger(__name__)


def fold_of_patients(patients: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of every sample: patients whole, stratified by label."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_patients = len(set(patients.tolist()))
    if folds < 2 or n_patients < folds:
        raise ValueError(f"cv.folds = {folds} needs at least {max(folds, 2)} patients in the train split, which has "
                         f"{n_patients}: lower cv.folds or give the train split more patients")
    strata = labels if labels.ndim == 1 else (labels.astype(np.int64) << np.arange(labels.shape[1])).sum(1)
    out = np.full(len(patients), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(patients)), strata, groups=patients)):
        out[held] = k
    return out


def _copy(src, rows: np.ndarray, store: Path) -> None:
    """The samples ``rows`` of the split ``src`` (a zarr group) as a store of their own."""
    import zarr

    if store.exists():
        shutil.rmtree(store)
    dst = zarr.open_group(store, mode="w")
    for name, arr in src.arrays():
        data = arr[:] if name != "images" else None
        chunks = (min(arr.chunks[0], max(len(rows), 1)),) + tuple(arr.chunks[1:])
        if name == "images":
            out = dst.create_array("images", shape=(len(rows),) + arr.shape[1:], chunks=chunks, dtype=arr.dtype,
                                   compressors=arr.compressors)
            for s in range(0, len(rows), chunks[0]):  # whole output chunks, read sample by sample
                out[s:s + chunks[0]] = np.stack([arr[int(i)] for i in rows[s:s + chunks[0]]])
        else:
            dst.create_array(name, data=data[rows], chunks=(max(len(rows), 1),) + tuple(arr.shape[1:]))
    dst.attrs.update(dict(src.attrs))


def make_folds(train_store: str | Path, out_dir: str | Path, table: str | Path, folds: int, seed: int) -> dict:
    """Write ``out_dir/<k>.zarr`` for k < ``folds`` from the train split, and ``table`` (CSV:
    pseudonymous patient, fold, images); returns the per-fold counts."""
    import zarr

    src = zarr.open_group(Path(train_store), mode="r")
    patients = np.array([str(v) for v in src["patient"][:].tolist()], dtype=object)
    labels = np.asarray(src["labels"][:])
    fold = fold_of_patients(patients, labels, folds, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for k in range(folds):
        rows = np.flatnonzero(fold == k)
        _copy(src, rows, out_dir / f"{k}.zarr")
        counts[str(k)] = {"images": int(len(rows)), "patients": int(len(set(patients[rows].tolist())))}
    frame = (pd.DataFrame({"patient": patients, "fold": fold}).groupby(["patient", "fold"]).size()
             .rename("images").reset_index().sort_values(["fold", "patient"]))
    atomic_write_text(Path(table), frame.to_csv(index=False))
    atomic_write_text(out_dir / "folds.json", json.dumps({"folds": folds, "seed": seed, "counts": counts}, indent=2))
    log.info("cv: %d folds of %s images", folds, ", ".join(str(c["images"]) for c in counts.values()))
    return counts


def fold_stores(folds_dir: str | Path, folds: int, k: int) -> tuple[list[Path], Path]:
    """(the stores fold ``k`` trains on, the store it validates on)."""
    folds_dir = Path(folds_dir)
    if not 0 <= k < folds:
        raise ValueError(f"fold {k} is not one of the {folds} folds")
    return [folds_dir / f"{j}.zarr" for j in range(folds) if j != k], folds_dir / f"{k}.zarr"
