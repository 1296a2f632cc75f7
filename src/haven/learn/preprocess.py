"""Preprocess: audited files → patient-level splits → decoded, windowed, resized Zarr shards.

Only data that passed the audit is read: :func:`preprocess` refuses to start unless the
anonymize stage's ``audit.json`` says ``passed``.  Files are decoded by their kind's reader
(:func:`haven.sources.reader_for`), labels encoded by the project's task
(:func:`haven.learn.tasks.get_task`); this module knows neither a file format nor a task.
Decoding runs on a ``dask.distributed`` cluster (a local one by default), one task per Zarr
chunk, and the workers write their chunks straight into the store.  Images are stored as uint8 in [0, 255] (CT: one channel
per HU window); the per-channel mean/std of the *train* split (in [0, 1] units) is stored
with the data and applied by the trainer on the device.

The Dask cluster is a ``LocalCluster`` of ``workers`` single-threaded processes inside the job
(``dask.cluster: local``), or, with ``dask.cluster: slurm``, a dask-jobqueue ``SLURMCluster``
whose workers are extra Slurm jobs (``dask.jobs`` jobs of ``dask.cores`` CPUs, on the site's
partition and account, see :mod:`haven.cluster`); the code that runs on them is the same.

2.5D (``slab: k``): a slice of a DICOM series is stored with its k neighbours on each side
(ordered along the patient z axis, ``ImagePositionPatient``, else ``InstanceNumber``; the
series' ends repeat the edge slice), so the channels are ``(2k+1) x windows``, slice-major.

Settings left out (by a caller without a validated config) are the schema's defaults
(:func:`complete`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from haven.io import atomic_write_text
from haven.learn import volumestore
from haven.learn.geometry import square as _square
from haven.progress import progress
from haven.sources import reader_for
from haven.track import file_hash

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What preprocess reads: the audited manifest, the audit's verdict on it, and the folder the
    manifest's ``file`` column is relative to.  The rule names them; :meth:`in_folder` is the
    anonymize stage's layout, for runs by hand and tests."""

    manifest: Path
    audit: Path
    data: Path

    @classmethod
    def of(cls, given: "str | Path | Inputs") -> "Inputs":
        if isinstance(given, Inputs):
            return given
        folder = Path(given)
        return cls(folder / "manifest.csv", folder / "audit.json", folder / "data")


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What preprocess writes: one Zarr store per split, the split table and the statistics."""

    train: Path
    val: Path
    test: Path
    splits: Path
    stats: Path

    @classmethod
    def of(cls, given: "str | Path | Outputs") -> "Outputs":
        if isinstance(given, Outputs):
            return given
        folder = Path(given)
        return cls(*(folder / f"{name}.zarr" for name in SPLITS), folder / "splits.csv", folder / "stats.json")

    def store(self, split: str) -> Path:
        return Path(getattr(self, split))


class AuditGateError(ValueError):
    """Raised when the input did not pass the de-identification audit."""


def check_audit(audit_json: Path) -> dict:
    """The audit's result in ``audit_json``; AuditGateError unless it is there and passed."""
    audit_json = Path(audit_json)
    if not audit_json.is_file():
        raise AuditGateError(
            f"{audit_json} is missing: run `haven audit` on {audit_json.parent} first; "
            "nothing downstream may read data that did not pass the audit"
        )
    result = json.loads(audit_json.read_text())
    if not result.get("passed"):
        raise AuditGateError(f"{audit_json} reports a failed audit: fix the leaks it lists and re-run anonymize")
    return result


# ---------------------------------------------------------------------------------------------
# splitting
def split_patients(manifest: pd.DataFrame, val: float, test: float, seed: int, strata=None) -> pd.Series:
    """Assign every patient to train/val/test, stratified by the patient's label (``strata``: the
    task's stratum of a label, e.g. a multi-label row's summary finding; None: the label itself);
    returns a Series patient → split.  No patient can land in two splits: the unit is the patient."""
    from sklearn.model_selection import train_test_split

    labels_of = manifest["label"] if strata is None else strata(manifest["label"])
    patients = labels_of.groupby(manifest["patient"]).agg(lambda s: s.mode().iloc[0])
    ids, labels = patients.index.to_numpy(), patients.to_numpy()

    def _split(ids, labels, frac):
        if frac <= 0 or len(ids) < 2:
            return ids, ids[:0], labels
        n_hold = max(1, int(round(frac * len(ids))))
        counts = pd.Series(labels).value_counts()
        strat = labels if counts.min() >= 2 and n_hold >= len(counts) and len(ids) - n_hold >= len(counts) else None
        keep, hold, keep_y, _ = train_test_split(ids, labels, test_size=n_hold, random_state=seed, stratify=strat)
        return keep, hold, keep_y

    rest, test_ids, rest_y = _split(ids, labels, test)
    train_ids, val_ids, _ = _split(rest, rest_y, val / (1 - test) if test < 1 else 0)
    out = pd.Series("train", index=patients.index, name="split")
    out[val_ids] = "val"
    out[test_ids] = "test"
    return out


# ---------------------------------------------------------------------------------------------
# decoding
def _resize(channel: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(channel.astype(np.float32), mode="F")
    shrinking = max(channel.shape) > size
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size, size), resample), dtype=np.float32)


def _one_slice(path: Path, kind: str, params: dict) -> np.ndarray:
    """One file → float (C, size, size) in [0, 1], C = the channels of one slice."""
    a = reader_for(kind).pixels(path, params["mode"], params["windows"])
    want = slice_channels(params)
    if a.shape[0] != want:
        a = np.repeat(a.mean(axis=0, keepdims=True), want, axis=0) if want == 3 or a.shape[0] == 3 else a[:want]
    return np.stack([_resize(c, params["size"]) for c in _square(a)])


def load_sample(path: Path | list, kind: str, params: dict) -> np.ndarray:
    """One file (or, 2.5D, the list of a slab's files, centre in the middle) → uint8 (C, size, size)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    # a path, or an open binary file (a request's bytes in memory: haven.predict never writes them)
    out = np.concatenate([_one_slice(Path(p) if isinstance(p, str) else p, kind, params) for p in paths])
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


class DecodeError(ValueError):
    """An audited file that cannot be decoded; the message names it and what to do."""


def load_batch(paths: list, kinds: list[str], params: dict) -> np.ndarray:
    out = []
    for p, k in zip(paths, kinds):
        try:
            out.append(load_sample(p, k, params))
        except Exception as e:
            raise _decode_error(p if isinstance(p, (str, Path)) else p[len(p) // 2], e) from None
    return np.stack(out)


def _decode_error(name, e: Exception) -> DecodeError:
    return DecodeError(f"{name} cannot be decoded ({type(e).__name__}: {e}); remove it from the source "
                       "(ingest checks pixel data by its structure and cannot see damage inside a compressed "
                       "stream) and re-run the pipeline")


# the settings that turn a file into a stored sample: the trained model carries them (model.pt),
# so that prediction on new data decodes exactly as training did (nothing recomputed there)
PIXEL_KEYS = ("size", "mode", "windows", "slab")


def pixel_settings(params: dict) -> dict:
    """The part of the preprocess settings that decides a sample's pixels (:data:`PIXEL_KEYS`; a
    volume's also its ``dims`` and ``spacing``)."""
    out = {k: params[k] for k in PIXEL_KEYS}
    if volumestore.is_volume(params):
        out.update(dims=3, spacing=volumestore.volume_spacing(params))
    return out


def slice_channels(params: dict) -> int:
    return {"gray": 1, "rgb": 3, "ct": len(params["windows"])}[params["mode"]]


def channels(params: dict) -> int:
    """Channels of a stored sample: a slice's, times the slab's slices (``params`` complete); a volume's."""
    if volumestore.is_volume(params):
        return volumestore.channels(params)
    return slice_channels(params) * (2 * params["slab"] + 1)


def _slice_position(path: str, kind: str) -> tuple[float, float]:
    """Where a slice lies along its series (runs on a Dask worker)."""
    return reader_for(kind).slice_position(path)


def slab_members(client, rows: pd.DataFrame, data_dir: Path, k: int) -> list[list[str]]:
    """For every row, the paths of its 2.5D slab: k neighbours on each side within its series,
    in z order (edge slices repeated); rows without a series (plain images) get themselves."""
    paths = [str(data_dir / f) for f in rows["file"]]
    if k <= 0:
        return [[p] for p in paths]
    kinds = list(rows["kind"])
    dicom = [i for i, kind in enumerate(kinds) if reader_for(kind).in_series and rows["series"].iloc[i]]
    futures = client.map(_slice_position, [paths[i] for i in dicom], [kinds[i] for i in dicom], pure=False)
    pos = dict(zip(dicom, client.gather(futures)))
    members = [[p] * (2 * k + 1) for p in paths]
    series = rows["series"].to_numpy()
    by_series: dict[str, list[int]] = {}
    for i in dicom:
        by_series.setdefault(series[i], []).append(i)
    for idx in by_series.values():
        def key(i):
            z, number = pos[i]
            return (0, z) if z == z else (1, number if number == number else 0.0, rows["file"].iloc[i])
        order = sorted(idx, key=key)
        for at, i in enumerate(order):
            members[i] = [paths[order[min(max(at + d, 0), len(order) - 1)]] for d in range(-k, k + 1)]
    return members


# ---------------------------------------------------------------------------------------------
def _client(params: dict):
    """The Dask client: a LocalCluster in this job, or worker jobs on Slurm (dask-jobqueue)."""
    from dask.distributed import Client, LocalCluster

    dask_cfg = params["dask"]
    if dask_cfg["cluster"] == "local":
        cluster = LocalCluster(n_workers=int(params["workers"]), threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.CRITICAL)  # task errors reach the client
        return Client(cluster)
    from dask_jobqueue import SLURMCluster

    from haven.cluster import rule_resources, site_settings

    site = rule_resources("cpu", site_settings())
    cores = int(dask_cfg["cores"])
    options = {"dashboard_address": ":0"}
    if dask_cfg["scheduler_host"]:
        options["host"] = dask_cfg["scheduler_host"]
    cluster = SLURMCluster(
        cores=cores, processes=cores, memory=dask_cfg["memory"],
        walltime=dask_cfg["walltime"], queue=dask_cfg["queue"] or site.get("slurm_partition"),
        account=dask_cfg["account"] or site.get("slurm_account"), job_name="haven-dask",
        python=sys.executable, log_directory=dask_cfg["log_directory"], scheduler_options=options,
        silence_logs="warning", worker_extra_args=["--nthreads", "1"])
    cluster.scale(jobs=int(dask_cfg["jobs"]))
    client = Client(cluster)
    try:
        client.wait_for_workers(1, timeout=float(dask_cfg["timeout"]))
    except Exception:
        client.close()
        cluster.close()
        raise RuntimeError(f"no Dask worker job started on Slurm within {dask_cfg['timeout']} s: check "
                           "`squeue --name haven-dask` (partition, account and memory come from preprocess.dask "
                           "and the site settings)") from None
    log.info("dask: %d worker job(s) on Slurm, %d workers so far", int(dask_cfg["jobs"]),
             len(client.scheduler_info()["workers"]))
    return client


def _store_batch(images, start: int, paths: list, kinds: list[str], params: dict, masks=None,
                 mask_sources: list | None = None) -> int:
    """Decode one chunk's samples (and, for a segmentation, their masks) and write them into the
    store (runs on a Dask worker); the count."""
    batch = load_batch(paths, kinds, params)
    images[start:start + len(batch)] = batch
    if masks is not None:
        from haven.learn.masks import load_masks

        masks[start:start + len(batch)] = load_masks(mask_sources, params["size"])
    return len(batch)


def write_split(client, rows: pd.DataFrame, data_dir: Path, store: Path, params: dict, classes: list[str],
                targets: np.ndarray, progress=None, mask_sources: list | None = None) -> None:
    """One split's Zarr store: the decoded images (written by the workers, chunk by chunk), the
    task's ``targets`` as ``labels`` (one row per sample, of any width), and the columns the subgroup analysis reads.  ``progress``:
    a :class:`haven.progress.Progress` told how many samples each finished chunk wrote."""
    import zarr
    from zarr.dtype import VariableLengthUTF8

    size, chunk, c = params["size"], params["chunk"], channels(params)
    if store.exists():
        shutil.rmtree(store)
    group = zarr.open_group(store, mode="w")
    n = len(rows)
    if volumestore.is_volume(params):  # one volume per chunk (volumestore's layout)
        masks, chunk = _write_volumes(client, group, rows, data_dir, params, progress, mask_sources), 1
    else:
        masks = _write_images(client, group, rows, data_dir, params, progress, mask_sources)
    if masks is not None:  # the image-level view: does the image show any foreground at all
        targets = _foreground(masks, chunk)
    group.create_array("labels", data=targets, chunks=(max(n, 1),) + tuple(targets.shape[1:]))
    for col in ("patient", "sex", "age_band", "site"):
        arr = group.create_array(col, shape=(n,), dtype=VariableLengthUTF8(), chunks=(max(n, 1),))
        if n:
            arr[:] = rows[col].fillna("").astype(str).to_numpy(dtype=object)
    group.attrs.update({"classes": classes, "size": size, "channels": c, "mode": params["mode"],
                        "slab": params["slab"], "pixels": pixel_settings(params),
                        "targets": "labels" if masks is None else "masks"})
    if volumestore.is_volume(params):
        group.attrs.update(volumestore.attrs(params))


def _write_images(client, group, rows: pd.DataFrame, data_dir: Path, params: dict, progress,
                  mask_sources: list | None):
    """A 2-D split's ``images`` (and ``masks``), decoded and written by the workers; the masks array."""
    from dask.distributed import as_completed
    from zarr.codecs import BloscCodec

    size, chunk, c = params["size"], params["chunk"], channels(params)
    n = len(rows)
    images = group.create_array(
        "images", shape=(n, c, size, size), chunks=(min(chunk, max(n, 1)), c, size, size), dtype="uint8",
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    )
    masks = None
    if mask_sources is not None:  # a segmentation's targets: a class map per image, chunked like the images
        masks = group.create_array("masks", shape=(n, size, size), chunks=(min(chunk, max(n, 1)), size, size),
                                   dtype="uint8", compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"))
    if n:
        paths = slab_members(client, rows, data_dir, params["slab"])
        kinds = list(rows["kind"])
        # one task per Zarr chunk, each writing whole chunks (no lock needed); a future per chunk
        # lets the progress count samples as they land
        futures = [client.submit(_store_batch, images, i, paths[i:i + chunk], kinds[i:i + chunk], params, masks,
                                 None if masks is None else mask_sources[i:i + chunk], pure=False)
                   for i in range(0, n, chunk)]
        for future in as_completed(futures):
            written = future.result()  # a DecodeError on a worker is raised here
            if progress is not None:
                progress.update(written)
    return masks


def _store_volume(images, masks, i: int, path: str, mask_path: str | None, params: dict) -> str:
    """Fit one volume (and its mask) and write it as chunk ``i`` (runs on a Dask worker, holding
    this one volume); its info as JSON.  No mask file: the chunk stays unwritten, all background."""
    try:
        image, mask, info = volumestore.fit_volume(path, mask_path, params)
    except Exception as e:
        raise _decode_error(path, e) from None
    images[i] = image
    if masks is not None and mask is not None:
        masks[i] = mask
    return info


def _write_volumes(client, group, rows: pd.DataFrame, data_dir: Path, params: dict, progress,
                   mask_sources: list | None):
    """A volume split's ``images`` (and ``masks``), one task and chunk per volume, and its ``info``
    (gathered here: one small array, written once); the masks array."""
    from dask.distributed import as_completed

    n = len(rows)
    images, masks = volumestore.create_arrays(group, n, channels(params), volumestore.volume_size(params),
                                              mask_sources is not None)
    sources = mask_sources if mask_sources is not None else [None] * n
    futures = {client.submit(_store_volume, images, masks, i, str(data_dir / f),
                             sources[i] if isinstance(sources[i], str) else None, params, pure=False): i
               for i, f in enumerate(rows["file"])}
    infos = [""] * n
    for future in as_completed(futures):
        infos[futures[future]] = future.result()  # a DecodeError on a worker is raised here
        if progress is not None:
            progress.update(1)
    volumestore.write_info(group, infos)
    return masks


def _foreground(masks, chunk: int) -> np.ndarray:
    """1 for every stored mask with any foreground pixel, else 0, read chunk by chunk."""
    n = masks.shape[0]
    parts = [np.asarray(masks[i:i + chunk]).reshape(min(chunk, n - i), -1).any(1) for i in range(0, n, chunk)]
    return (np.concatenate(parts) if parts else np.zeros(0, bool)).astype(np.int64)


def channel_stats(store: Path) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] units over a Zarr split, chunk by chunk."""
    import zarr

    images = zarr.open_group(store, mode="r")["images"]
    c = images.shape[1]
    s, ss, count = np.zeros(c), np.zeros(c), 0
    step = images.chunks[0]
    for i in range(0, images.shape[0], step):
        x = images[i:i + step].astype(np.float64) / 255.0
        axes = (0,) + tuple(range(2, x.ndim))  # all but the channel: (N, C, H, W) or a volume's (N, C, D, H, W)
        s += x.sum(axis=axes)
        ss += (x ** 2).sum(axis=axes)
        count += x.size // c
    mean = s / max(count, 1)
    std = np.sqrt(np.maximum(ss / max(count, 1) - mean ** 2, 1e-12))
    return mean.tolist(), std.tolist()


def complete(params: dict) -> dict:
    """The preprocess settings with every key left out taken from the schema's defaults (one level
    into ``split`` and ``dask``), for callers without a validated config."""
    from haven.config import section_defaults

    full = section_defaults("preprocess")
    for key, value in params.items():
        full[key] = {**full[key], **value} if isinstance(full.get(key), dict) and isinstance(value, dict) else value
    return full


def require_labels(manifest: pd.DataFrame, path: Path) -> None:
    """Training needs a label on every file; de-identification does not (a project with ``until:
    audit`` ingests unlabeled files), so an unlabeled manifest is stopped here, by name."""
    missing = int((manifest["label"].str.strip() == "").sum()) if "label" in manifest else len(manifest)
    if missing:
        raise ValueError(
            f"{path}: {missing} of {len(manifest)} files have no label, and training needs one per file: "
            f"give the project a label table (`labels`) or class folders and re-run ingest, or set "
            f"`until: audit` in its config to stop at the de-identification")


def preprocess(inputs: Path | Inputs, outputs: Path | Outputs, params: dict, *, seed: int,
               task: str | None = None, task_options: dict | None = None) -> dict:
    """Split the audited manifest by patient and write the Zarr store of each split, the split
    table and ``stats.json``.  ``inputs``/``outputs``: :class:`Inputs`/:class:`Outputs`, or the
    anonymize stage's folder and the folder to write ``{train,val,test}.zarr``, ``splits.csv``
    and ``stats.json`` into.  ``params``: the ``preprocess`` settings; ``task``: the project's
    task (None: the schema's default) encodes the labels."""
    from haven.learn.tasks import get_task

    inputs, outputs = Inputs.of(inputs), Outputs.of(outputs)
    check_audit(inputs.audit)
    params = complete(params)
    if task is None:
        from haven.config import section_defaults

        task = section_defaults("task")
    task = get_task(task, task_options)
    from haven.learn.masks import mask_sources, sample_rows, seg_index

    every = pd.read_csv(inputs.manifest, dtype=str, keep_default_na=False)
    manifest = sample_rows(every)  # a DICOM-SEG is a mask object, never a sample
    if manifest.empty:
        raise ValueError(f"{inputs.manifest} lists no files: check the ingest quarantine list")
    volumestore.check_settings(params, manifest["kind"], inputs.manifest)
    if task.needs_labels:
        require_labels(manifest, inputs.manifest)
    classes = task.classes(manifest["label"])
    if len(classes) < 2:
        raise ValueError(f"{inputs.manifest}: need at least two classes, found {classes}")
    split = split_patients(manifest, params["split"]["val"], params["split"]["test"], seed, task.strata)
    manifest["split"] = manifest["patient"].map(split)

    client = _client(params)
    try:
        segs = seg_index(client, every, inputs.data, params["size"]) if task.targets == "masks" else {}
        with progress("preprocess", len(manifest), log=log, unit="samples") as p:
            for name in SPLITS:
                rows = manifest[manifest["split"] == name].reset_index(drop=True)
                masks = mask_sources(client, rows, inputs.data, segs) if task.targets == "masks" else None
                write_split(client, rows, inputs.data, outputs.store(name), params, classes,
                            task.encode(rows["label"], classes), progress=p, mask_sources=masks)
    finally:
        client.close()
        client.cluster.close()

    mean, std = channel_stats(outputs.train)
    import zarr

    for name in SPLITS:
        zarr.open_group(outputs.store(name), mode="r+").attrs.update({"mean": mean, "std": std})
    counts = {name: task.counts(manifest[manifest["split"] == name]["label"], classes) for name in SPLITS}
    stats = {
        "classes": classes,
        "channels": channels(params),
        "size": volumestore.volume_size(params) if volumestore.is_volume(params) else params["size"],
        "mean": mean,
        "std": std,
        "samples": {name: int((manifest["split"] == name).sum()) for name in SPLITS},
        "patients": {name: int(split.eq(name).sum()) for name in SPLITS},
        "per_class": counts,
        "data_manifest_hash": file_hash(inputs.manifest),
    }
    atomic_write_text(outputs.splits, manifest[["file", "patient", "label", "split"]].to_csv(index=False))
    atomic_write_text(outputs.stats, json.dumps(stats, indent=2))
    return stats
