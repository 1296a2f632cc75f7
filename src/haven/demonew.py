"""Demo sets of *new* patients for the predict DAG: unlabeled, held back from training, PHI planted.

* :func:`make_digits_new` - ``digits-new``: 60 digit images as a hospital export would name them,
  ``PAT<MRN>_<YYYYMMDD>.png`` in one flat folder (no class folders, no label table).  The file
  name is the identifier (the images reader takes the patient from the path) and some files carry
  the patient's name and MRN in a PNG text chunk, so the gate has something to remove.
  scikit-learn ships only 1797 digits and the training demo (:func:`haven.demo.make_digits`) uses
  every one (tests and the ingest benchmark count them), so none can be held back: each new image
  is a seeded digit *re-scanned* - rotated (±12°), scaled (0.9-1.1), shifted (±0.6 px) at 4x
  resolution, averaged back to 8x8 and given sensor noise.  They are new pixels of the training
  distribution, not new writers: read their accuracy as a check that prediction works, not as
  generalisation.
* :func:`make_brain_ct_new` - ``brain-ct-new``: 12 patients × 4 slices written exactly as
  :func:`haven.demo.make_brain_ct` writes its patients (the same PHI in the same places: names,
  ids, dates, the private block, the image comments), half with a hemorrhage, from another
  random stream and other UIDs, so no patient, study or instance is one of the training demo's;
  no label table (``dicom/`` is the source).

Both are deterministic for a seed and take well under 5 s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from haven import demo

log = logging.getLogger(__name__)

# mixed into the seeds so that `haven demo brain-ct --seed N` never writes the patients of
# `haven demo brain-ct-new --seed M` (another random stream, other UIDs)
_NEW_STREAM = 20_240_601


def _rescan(img: np.ndarray, rng: np.random.Generator, up: int = 4) -> np.ndarray:
    """A digit (8x8, 0..16) re-scanned: a small rigid+scale transform at ``up``x resolution,
    block-averaged back and noised; returns uint8 0..255."""
    from scipy import ndimage as ndi

    big = ndi.zoom(img.astype(np.float32), up, order=1)
    n = big.shape[0]
    c = np.array([(n - 1) / 2, (n - 1) / 2])
    theta = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.6, 0.6, size=2) * up
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = rot / scale
    moved = ndi.affine_transform(big, m, offset=c - m @ (c + shift), order=1, cval=0.0, mode="constant")
    small = moved.reshape(8, up, 8, up).mean(axis=(1, 3))
    small = small * (255.0 / 16.0) + rng.normal(0.0, 6.0, size=small.shape)
    return np.rint(small).clip(0, 255).astype(np.uint8)


def make_digits_new(out_dir: Path, n: int = 60, seed: int = 0) -> dict:
    """Write ``n`` re-scanned digits as ``out_dir/PAT<MRN>_<YYYYMMDD>.png`` (see the module docstring)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, _NEW_STREAM])
    digits = load_digits()
    picks = rng.choice(len(digits.images), size=n, replace=False)
    patients = demo.fictional_patients(n, rng)  # the brain-CT demo's fictional people: names, MRNs, dates
    tmp = demo.prepare_folder(out_dir)
    try:
        with_text = 0
        for k, (i, p) in enumerate(zip(picks, patients)):
            info = None
            if k % 3 == 0:  # a third carry the scanner's text chunk (PHI the gate must strip)
                info = PngInfo()
                info.add_text("Comment", f"Patient {p['name']}, {p['mrn']}, born {p['birth'].isoformat()}")
                with_text += 1
            name = f"PAT{p['mrn'].removeprefix('MRN')}_{p['study'].strftime('%Y%m%d')}.png"
            Image.fromarray(_rescan(digits.images[i], rng), mode="L").save(tmp / name, pnginfo=info)
        demo.commit_folder(tmp, out_dir)
    except BaseException:
        demo.abort_folder(tmp)
        raise
    # the true digits stay in the summary's counts only (the set is unlabeled)
    truth = np.bincount(digits.target[picks], minlength=10)
    log.info("digits-new demo: %d unlabeled images under %s", n, out_dir)
    return {"out_dir": str(out_dir), "images": int(n), "with_text_chunk": with_text,
            "per_class": {str(c): int(v) for c, v in enumerate(truth)}}


def make_brain_ct_new(out_dir: Path, n_patients: int = 12, slices: int = 4, seed: int = 0) -> dict:
    """Write ``out_dir/dicom/<PatientID>/<StudyDate>_<Accession>/<InstanceNumber>.dcm`` for
    ``n_patients`` new, unlabeled patients (see the module docstring)."""
    if n_patients < 1 or slices < 1:
        raise ValueError("make_brain_ct_new needs n_patients >= 1 and slices >= 1")
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, _NEW_STREAM])
    base, base_desc = demo.base_slice()
    patients = demo.fictional_patients(n_patients, rng)
    tmp = demo.prepare_folder(out_dir)
    try:
        n_files, _, _ = demo.write_patients(tmp / "dicom", patients, slices, f"new-{seed}", rng, base)
        demo.commit_folder(tmp, out_dir)
    except BaseException:
        demo.abort_folder(tmp)
        raise
    pos = sum(p["label"] for p in patients)
    log.info("brain-ct-new demo: %d unlabeled patients, %d slices under %s", n_patients, n_files, out_dir)
    return {"out_dir": str(out_dir), "patients": n_patients, "slices": n_files, "hemorrhage": pos,
            "normal": n_patients - pos, "base": base_desc}
