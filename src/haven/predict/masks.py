"""A segmentation's predicted masks, one set of files per predicted image, in the predict stage's
``masks/`` folder (de-identified zone: named and referenced by the audited files only).

Per image, under the image's own pseudonymous path (``<shard>/<patient>/<study>/<sop>``):

* ``.png``: the class map at the file's own Rows x Columns (the model's square prediction resized
  back, nearest, onto the centre square preprocess cropped: :func:`haven.learn.geometry.unfit_mask`;
  the cut-off sides are background);
* ``.nii.gz``: the same map as NIfTI, with the DICOM image plane as its affine (identity for photos);
* ``.seg.dcm`` (DICOM sources): a DICOM-SEG referencing the audited instance it segments
  (:func:`haven.predict.seg.write_dicom_seg`), so a viewer shows it over the de-identified series.

A 3D model's mask is one ``<stem>.mask.nii.gz`` per volume, on the volume's own grid
(:mod:`haven.predict.volumes`).

A folder of a task that predicts no masks holds a ``README.txt`` that says so (the rule declares
the folder for every project).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

README = "{task}: this task predicts no masks (only a segmentation project writes them here)\n"


def _source_shape(path: Path, kind: str):
    """(rows, cols, the DICOM dataset or None) of an audited file."""
    if kind == "dicom":
        import pydicom

        ds = pydicom.dcmread(path)
        return int(ds.Rows), int(ds.Columns), ds
    from PIL import Image

    with Image.open(path) as img:
        return img.height, img.width, None


def write_one(mask: np.ndarray, file: str, kind: str, data_dir: Path, out_dir: Path, classes: list[str],
              model: str, version: str | None) -> list[str]:
    """The files of one predicted mask; returns their paths relative to ``out_dir``."""
    from haven.learn.geometry import unfit_mask
    from haven.predict import seg

    rows, cols, ds = _source_shape(Path(data_dir) / file, kind)
    full = unfit_mask(mask, (rows, cols))
    target = Path(out_dir) / file[: -len(Path(file).suffix) or None]
    target.parent.mkdir(parents=True, exist_ok=True)
    # names appended, never with_suffix: a DICOM file's stem is its UID, dots and all
    written = [seg.write_png(full, target.parent / f"{target.name}.png")]
    affine = None
    if ds is not None:
        try:
            affine = seg.dicom_affine(ds)
        except ValueError:
            affine = None  # no image plane: the NIfTI keeps pixel indices (identity)
    written.append(seg.write_nifti(full, target.parent / f"{target.name}.nii.gz", affine))
    if ds is not None:
        written.append(seg.write_dicom_seg(full, ds, target.parent / f"{target.name}.seg.dcm", classes, model,
                                           version))
    return [str(Path(p).relative_to(out_dir)) for p in written]


def mark_empty(out_dir: Path, task: str) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "README.txt").write_text(README.format(task=task))
