"""The masks a segmentation project's splits store beside their images (preprocess, on Dask).

An image's mask comes from one of two places in the audited data (the anonymize stage's
manifest, :mod:`haven.sources.masks` reads both kinds):

* a mask file written beside the de-identified image (manifest column ``mask``: PNG, TIFF or
  NIfTI), or
* a DICOM-SEG object of its own (a manifest row with ``role`` ``mask``), whose frames name the
  instances they segment; anonymize mapped those references with the same keyed UIDs as the
  images, so they are joined here by SOPInstanceUID.

An image with neither is all background (a normal slice of a lesion series, a healthy patient).
Masks are cropped and resized like their images (:func:`haven.learn.preprocess.fit_mask`:
centre square, nearest interpolation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

MASK_ROLE = "mask"


def sample_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's samples: every row but the mask objects (a DICOM-SEG is never a sample, in
    any task: a classification project on the same folder ignores it)."""
    if "role" not in manifest:
        return manifest
    return manifest[manifest["role"].fillna("").str.strip().str.lower() != MASK_ROLE].reset_index(drop=True)


def mask_objects(manifest: pd.DataFrame) -> pd.DataFrame:
    if "role" not in manifest:
        return manifest.iloc[:0]
    return manifest[manifest["role"].fillna("").str.strip().str.lower() == MASK_ROLE].reset_index(drop=True)


def _seg_fitted(path: str, size: int) -> dict[str, np.ndarray]:
    """One DICOM-SEG → {referenced SOPInstanceUID: fitted mask} (runs on a Dask worker)."""
    from haven.learn.geometry import fit_mask
    from haven.sources.masks import seg_masks

    try:
        return {sop: fit_mask(m, size) for sop, m in seg_masks(path).items()}
    except Exception as e:
        raise ValueError(f"{path}: the DICOM-SEG cannot be read ({type(e).__name__}: {e}); remove it from the "
                         "source or re-export it, and re-run the pipeline") from None


def _sop_uid(path: str) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.get("SOPInstanceUID", ""))


def seg_index(client, manifest: pd.DataFrame, data_dir: Path, size: int) -> dict[str, np.ndarray]:
    """Every DICOM-SEG of the manifest read on the workers: {segmented SOPInstanceUID: fitted mask}."""
    segs = mask_objects(manifest)
    fitted: dict[str, np.ndarray] = {}
    if segs.empty:
        return fitted
    for part in client.gather(client.map(_seg_fitted, [str(data_dir / f) for f in segs["file"]],
                                         [size] * len(segs), pure=False)):
        for sop, m in part.items():  # two SEGs of one instance: their classes unite, the higher wins
            fitted[sop] = np.maximum(fitted[sop], m) if sop in fitted else m
    return fitted


def mask_sources(client, samples: pd.DataFrame, data_dir: Path, segs: dict[str, np.ndarray]) -> list:
    """Per sample row: its mask file's path (str), its fitted DICOM-SEG mask (uint8 array, from
    :func:`seg_index`) or None (all background)."""
    files = samples["mask"].fillna("") if "mask" in samples else pd.Series([""] * len(samples))
    out: list = [str(data_dir / m) if m else None for m in files]
    if not segs:
        return out
    dicom = [i for i, (k, src) in enumerate(zip(samples["kind"], out)) if src is None and k == "dicom"]
    sops = client.gather(client.map(_sop_uid, [str(data_dir / samples["file"].iloc[i]) for i in dicom], pure=False))
    for i, sop in zip(dicom, sops):
        out[i] = segs.get(sop)
    return out


def load_masks(sources: list, size: int) -> np.ndarray:
    """The chunk's masks (n, size, size) uint8 from :func:`mask_sources`' entries (on a worker)."""
    from haven.learn.geometry import fit_mask
    from haven.sources.masks import read_mask

    out = np.zeros((len(sources), size, size), np.uint8)
    for i, src in enumerate(sources):
        if isinstance(src, str):
            try:
                out[i] = fit_mask(read_mask(src), size)
            except Exception as e:
                raise ValueError(f"{src}: the mask cannot be read ({type(e).__name__}: {e}); fix or remove it "
                                 "and re-run the pipeline") from None
        elif src is not None:
            out[i] = src
    return out
