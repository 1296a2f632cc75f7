"""The predict stage: audited new data → ``predictions.csv`` and ``summary.json``.

Reads only what passed the audit (the gate preprocess applies: :func:`haven.learn.preprocess.check_audit`);
decodes each file with the *training run's* preprocessing carried by the bundle
(:mod:`haven.predict.bundle`), 2.5D slabs from the file's own series as preprocess builds them;
a 3D model's NIfTI volumes whole, fitted as its training volumes were (:mod:`haven.predict.volumes`);
writes one row per file with the pseudonymous ids of the anonymize manifest (patient, study,
series, instance) and the bundle's columns.  A file that cannot be decoded gets a row with its
``status`` (the reason) and no probabilities: one bad file never stops a cohort.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from haven.io import atomic_write_text
from haven.learn.preprocess import Inputs, check_audit, slab_members
from haven.predict import volumes
from haven.progress import progress
from haven.sources import reason

log = logging.getLogger(__name__)

ID_COLUMNS = ("file", "kind", "patient", "study", "series", "instance")


class _Serial:
    """The two calls of a Dask client :func:`slab_members` makes, run here (predict needs no cluster)."""

    @staticmethod
    def map(fn, *iterables, pure=False):
        return [fn(*args) for args in zip(*iterables)]

    @staticmethod
    def gather(results):
        return results


def _ids(rows: pd.DataFrame) -> pd.DataFrame:
    out = rows.reindex(columns=["file", "kind", "patient", "study", "series"], fill_value="").copy()
    # the anonymize stage names a DICOM file by its keyed SOP Instance UID: <shard>/<patient>/<study>/<sop>.dcm
    out["instance"] = [Path(f).stem if k == "dicom" else "" for f, k in zip(rows["file"], rows["kind"])]
    return out


def _decode_block(bundle, block: list[tuple[int, list[str], str]]) -> list[tuple[int, np.ndarray | None, str]]:
    """Decode one batch's files (in a worker thread): (row, sample or None, status)."""
    out = []
    for i, paths, kind in block:
        try:
            out.append((i, bundle.sample(paths if len(paths) > 1 else paths[0], kind), "ok"))
        except Exception as e:  # named in the table by its pseudonymous file, never stopping the cohort
            out.append((i, None, f"not decoded: {reason(e, Path(paths[len(paths) // 2]))}"))
    return out


def run(inputs: Inputs, bundle, *, batch_size: int = 64, workers: int = 2, masks: Path | None = None) -> pd.DataFrame:
    """The predictions table of an audited dataset (``inputs``: its anonymize manifest, audit and data).
    ``workers`` threads decode the next batches while the network runs on the current one (pydicom's
    and PIL's decoders release the GIL): decoding costs as much as the forward pass at 64 px.
    ``masks``: the folder a segmentation's predicted masks go to (:mod:`haven.predict.masks`)."""
    from concurrent.futures import ThreadPoolExecutor

    from haven.learn.masks import sample_rows

    check_audit(inputs.audit)
    rows = sample_rows(pd.read_csv(inputs.manifest, dtype=str, keep_default_na=False))
    if getattr(bundle, "dims", 2) == 3:  # one volume per row, fitted whole (haven.predict.volumes)
        return _table(rows, *volumes.run(rows, Path(inputs.data), bundle, batch_size=batch_size, workers=workers,
                                         masks=masks))
    members = slab_members(_Serial(), rows, Path(inputs.data), int(bundle.pixels.get("slab") or 0))
    items = [(i, paths, kind) for i, (paths, kind) in enumerate(zip(members, rows["kind"]))]
    blocks = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    out: list[dict] = [{} for _ in range(len(rows))]
    status = ["ok"] * len(rows)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            progress("predict", len(rows), log=log, unit="files") as bar:
        ahead = [pool.submit(_decode_block, bundle, b) for b in blocks[:max(1, workers)]]
        for k in range(len(blocks)):
            decoded = ahead.pop(0).result()
            if k + len(ahead) + 1 < len(blocks):
                ahead.append(pool.submit(_decode_block, bundle, blocks[k + len(ahead) + 1]))
            good = [(i, x) for i, x, st in decoded if x is not None]
            for i, _, st in decoded:
                status[i] = st
                if st != "ok":
                    log.warning("%s: %s", rows["file"].iloc[i], st)
            if good:
                table_rows, predicted = bundle.outputs(np.stack([x for _, x in good]), batch_size)
                for (i, _), row in zip(good, table_rows):
                    out[i] = row
                if predicted is not None and masks is not None:
                    _write_masks(good, predicted, rows, inputs, masks, bundle, out)
            bar.update(len(decoded))
    return _table(rows, out, status)


def _table(rows: pd.DataFrame, out: list[dict], status: list[str]) -> pd.DataFrame:
    table = pd.concat([_ids(rows), pd.DataFrame(out, index=rows.index)], axis=1)
    table["status"] = status
    return table


def _write_masks(good, predicted, rows: pd.DataFrame, inputs: Inputs, folder: Path, bundle, out: list) -> None:
    """One batch's predicted masks as files; each row names them (``mask_files``)."""
    from haven.predict.masks import write_one

    for (i, _), m in zip(good, predicted):
        try:
            files = write_one(m, rows["file"].iloc[i], rows["kind"].iloc[i], Path(inputs.data), Path(folder),
                              bundle.classes, bundle.name, bundle.version)
        except Exception as e:  # the row keeps its prediction; the mask's failure is named, the cohort goes on
            log.warning("%s: mask not written: %s", rows["file"].iloc[i], reason(e, Path(rows["file"].iloc[i])))
            files = []
        out[i]["mask_files"] = ";".join(files)


def summary(table: pd.DataFrame, bundle) -> dict:
    """What the report shows of a prediction run: counts per predicted class, mean calibrated
    probabilities, the model and the files not decoded (no identifier, pseudonymous or other)."""
    ok = table[table["status"] == "ok"]
    classes = bundle.classes
    return {"files": int(len(table)), "predicted": int(len(ok)), "not_decoded": int(len(table) - len(ok)),
            "patients": int(ok["patient"].nunique()) if len(ok) else 0,
            "per_class": {c: int(n) for c, n in sorted(Counter(ok["predicted"]).items())} if len(ok) else {},
            # calibrated where the task calibrates (pcal_), else its probabilities (a segmentation's p_<class>)
            "mean_calibrated": {c: float(ok[col].mean()) for c in classes
                                for col in [f"pcal_{c}" if f"pcal_{c}" in ok else f"p_{c}"] if col in ok}
            if len(ok) else {},
            "model": bundle.describe()}


def predict(inputs: Inputs, bundle, predictions: Path, summary_path: Path, *, batch_size: int = 64,
            workers: int = 2, masks: Path | None = None) -> dict:
    """The stage: write ``predictions`` (CSV), ``summary_path`` (JSON) and, given ``masks``, the
    predicted masks there (a task that predicts none: a README saying so); returns the summary."""
    if masks is not None:
        import shutil

        from haven.predict.masks import mark_empty

        shutil.rmtree(masks, ignore_errors=True)  # a re-run leaves no mask of a file no longer there
        if bundle.task.targets != "masks":
            mark_empty(masks, bundle.task.name)
        Path(masks).mkdir(parents=True, exist_ok=True)
    table = run(inputs, bundle, batch_size=batch_size, workers=workers, masks=masks)
    Path(predictions).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(predictions, table.to_csv(index=False))
    s = summary(table, bundle)
    atomic_write_text(summary_path, json.dumps(s, indent=2))
    return s
