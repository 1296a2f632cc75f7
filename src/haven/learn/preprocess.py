"""Preprocess: audited files → patient-level splits → decoded, windowed, resized Zarr shards.

Only data that passed the audit is read: :func:`preprocess` refuses to start unless the
anonymize stage's ``audit.json`` says ``passed``.  Decoding runs on a ``dask.distributed``
cluster (a local one by default), one task per Zarr chunk, and the workers write their
chunks straight into the store.  Images are stored as uint8 in [0, 255] (CT: one channel
per HU window); the per-channel mean/std of the *train* split (in [0, 1] units) is stored
with the data and applied by the trainer on the device.

The Dask cluster is a ``LocalCluster`` of ``workers`` single-threaded processes inside the job
(``dask.cluster: local``), or, with ``dask.cluster: slurm``, a dask-jobqueue ``SLURMCluster``
whose workers are extra Slurm jobs (``dask.jobs`` jobs of ``dask.cores`` CPUs, on the site's
partition and account, see :mod:`haven.cluster`); the code that runs on them is the same.

2.5D (``slab: k``): a slice of a DICOM series is stored with its k neighbours on each side
(ordered along the patient z axis, ``ImagePositionPatient``, else ``InstanceNumber``; the
series' ends repeat the edge slice), so the channels are ``(2k+1) x windows``, slice-major.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from haven.io import atomic_write_text
from haven.track import file_hash

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class AuditGateError(ValueError):
    """Raised when the input did not pass the de-identification audit."""


def check_audit(anon_dir: Path) -> dict:
    audit_json = Path(anon_dir) / "audit.json"
    if not audit_json.is_file():
        raise AuditGateError(
            f"{audit_json} is missing: run `haven audit` on {anon_dir} first; "
            "nothing downstream may read data that did not pass the audit"
        )
    result = json.loads(audit_json.read_text())
    if not result.get("passed"):
        raise AuditGateError(f"{audit_json} reports a failed audit: fix the leaks it lists and re-run anonymize")
    return result


# ---------------------------------------------------------------------------------------------
# splitting
def split_patients(manifest: pd.DataFrame, val: float, test: float, seed: int) -> pd.Series:
    """Assign every patient to train/val/test, stratified by the patient's label; returns a
    Series patient → split.  No patient can land in two splits because the unit is the patient."""
    from sklearn.model_selection import train_test_split

    patients = manifest.groupby("patient")["label"].agg(lambda s: s.mode().iloc[0])
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


def _square(a: np.ndarray) -> np.ndarray:
    """Centre-crop the longer side so that resizing keeps the aspect ratio."""
    h, w = a.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return a[..., top:top + s, left:left + s]


def decode_dicom(path: Path, mode: str, windows: list[dict]) -> np.ndarray:
    """DICOM → float32 (C, H, W) in [0, 1]: HU windows for ``ct``, VOI/min-max otherwise."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3:  # colour
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        rgb = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else max(arr.max(), 1))
        out = rgb.transpose(2, 0, 1)
        return out.mean(axis=0, keepdims=True) if mode == "gray" else out
    if mode == "ct":
        hu = apply_modality_lut(arr, ds).astype(np.float32)
        chans = [np.clip((hu - (w["center"] - w["width"] / 2)) / w["width"], 0.0, 1.0) for w in windows]
        return np.stack(chans)
    img = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    return img[None]


def decode_image(path: Path, mode: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if mode == "rgb" else "L")
        a = np.asarray(im, dtype=np.float32) / 255.0
    return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]


def _one_slice(path: Path, kind: str, params: dict) -> np.ndarray:
    """One file → float (C, size, size) in [0, 1], C = the channels of one slice."""
    mode, size = params["mode"], params["size"]
    a = decode_dicom(path, mode, params["windows"]) if kind == "dicom" else decode_image(path, "gray" if mode == "ct" else mode)
    want = slice_channels(params)
    if a.shape[0] != want:
        a = np.repeat(a.mean(axis=0, keepdims=True), want, axis=0) if want == 3 or a.shape[0] == 3 else a[:want]
    a = _square(a)
    return np.stack([_resize(c, size) for c in a])


def load_sample(path: Path | list, kind: str, params: dict) -> np.ndarray:
    """One file (or, 2.5D, the list of a slab's files, centre in the middle) → uint8 (C, size, size)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    out = np.concatenate([_one_slice(Path(p), kind, params) for p in paths])
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


class DecodeError(ValueError):
    """An audited file that cannot be decoded; the message names it and what to do."""


def load_batch(paths: list, kinds: list[str], params: dict) -> np.ndarray:
    out = []
    for p, k in zip(paths, kinds):
        try:
            out.append(load_sample(p, k, params))
        except Exception as e:
            name = p if isinstance(p, (str, Path)) else p[len(p) // 2]
            raise DecodeError(f"{name} cannot be decoded ({type(e).__name__}: {e}); remove it from the source "
                              "(ingest quarantines undecodable pixel data) and re-run the pipeline") from None
    return np.stack(out)


def slice_channels(params: dict) -> int:
    return {"gray": 1, "rgb": 3, "ct": len(params["windows"])}[params["mode"]]


def channels(params: dict) -> int:
    return slice_channels(params) * (2 * int(params.get("slab", 0) or 0) + 1)


def _slice_position(path: str) -> tuple[float, float]:
    """Where a slice lies along its series: z of ImagePositionPatient, else InstanceNumber."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["ImagePositionPatient", "InstanceNumber"])
    try:
        z = float(ds.ImagePositionPatient[2])
    except Exception:
        z = float("nan")
    try:
        number = float(ds.InstanceNumber)
    except Exception:
        number = float("nan")
    return z, number


def slab_members(client, rows: pd.DataFrame, data_dir: Path, k: int) -> list[list[str]]:
    """For every row, the paths of its 2.5D slab: k neighbours on each side within its series,
    in z order (edge slices repeated); rows without a series (plain images) get themselves."""
    paths = [str(data_dir / f) for f in rows["file"]]
    if k <= 0:
        return [[p] for p in paths]
    dicom = [i for i, kind in enumerate(rows["kind"]) if kind == "dicom" and rows["series"].iloc[i]]
    futures = client.map(_slice_position, [paths[i] for i in dicom], pure=False)
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

    dask_cfg = params.get("dask") or {}
    if dask_cfg.get("cluster", "local") == "local":
        cluster = LocalCluster(n_workers=int(params.get("workers", 2)), threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.CRITICAL)  # task errors reach the client
        return Client(cluster)
    from dask_jobqueue import SLURMCluster

    from haven.cluster import rule_resources, site_settings

    site = rule_resources("cpu", site_settings())
    cores = int(dask_cfg.get("cores", 4))
    options = {"dashboard_address": ":0"}
    if dask_cfg.get("scheduler_host"):
        options["host"] = dask_cfg["scheduler_host"]
    cluster = SLURMCluster(
        cores=cores, processes=cores, memory=dask_cfg.get("memory", "8GB"),
        walltime=dask_cfg.get("walltime", "01:00:00"), queue=dask_cfg.get("queue") or site.get("slurm_partition"),
        account=dask_cfg.get("account") or site.get("slurm_account"), job_name="haven-dask",
        python=sys.executable, log_directory=dask_cfg.get("log_directory"), scheduler_options=options,
        silence_logs="warning", worker_extra_args=["--nthreads", "1"])
    cluster.scale(jobs=int(dask_cfg.get("jobs", 2)))
    client = Client(cluster)
    try:
        client.wait_for_workers(1, timeout=float(dask_cfg.get("timeout", 600)))
    except Exception:
        client.close()
        cluster.close()
        raise RuntimeError(f"no Dask worker job started on Slurm within {dask_cfg.get('timeout', 600)} s: check "
                           "`squeue --name haven-dask` (partition, account and memory come from preprocess.dask "
                           "and the site settings)") from None
    log.info("dask: %d worker job(s) on Slurm, %d workers so far", int(dask_cfg.get("jobs", 2)),
             len(client.scheduler_info()["workers"]))
    return client


def write_split(client, rows: pd.DataFrame, data_dir: Path, store: Path, params: dict, classes: list[str]) -> None:
    import dask.array as da
    import zarr
    from dask import delayed
    from zarr.codecs import BloscCodec
    from zarr.dtype import VariableLengthUTF8

    size, chunk, c = params["size"], params["chunk"], channels(params)
    if store.exists():
        shutil.rmtree(store)
    group = zarr.open_group(store, mode="w")
    n = len(rows)
    images = group.create_array(
        "images", shape=(n, c, size, size), chunks=(min(chunk, max(n, 1)), c, size, size), dtype="uint8",
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    )
    if n:
        paths = slab_members(client, rows, data_dir, int(params.get("slab", 0) or 0))
        kinds = list(rows["kind"])
        blocks = [
            da.from_delayed(delayed(load_batch)(paths[i:i + chunk], kinds[i:i + chunk], params),
                            shape=(len(paths[i:i + chunk]), c, size, size), dtype=np.uint8)
            for i in range(0, n, chunk)
        ]
        da.store(da.concatenate(blocks), images, lock=False, compute=True)
    label_idx = rows["label"].map({k: i for i, k in enumerate(classes)}).to_numpy(np.int64)
    group.create_array("labels", data=label_idx, chunks=(max(n, 1),))
    for col in ("patient", "sex", "age_band", "site"):
        arr = group.create_array(col, shape=(n,), dtype=VariableLengthUTF8(), chunks=(max(n, 1),))
        if n:
            arr[:] = rows[col].fillna("").astype(str).to_numpy(dtype=object)
    group.attrs.update({"classes": classes, "size": size, "channels": c, "mode": params["mode"],
                        "slab": int(params.get("slab", 0) or 0)})


def channel_stats(store: Path) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] units over a Zarr split, chunk by chunk."""
    import zarr

    images = zarr.open_group(store, mode="r")["images"]
    c = images.shape[1]
    s, ss, count = np.zeros(c), np.zeros(c), 0
    step = images.chunks[0]
    for i in range(0, images.shape[0], step):
        x = images[i:i + step].astype(np.float64) / 255.0
        s += x.sum(axis=(0, 2, 3))
        ss += (x ** 2).sum(axis=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / max(count, 1)
    std = np.sqrt(np.maximum(ss / max(count, 1) - mean ** 2, 1e-12))
    return mean.tolist(), std.tolist()


def preprocess(anon_dir: Path, out_dir: Path, params: dict, seed: int = 42) -> dict:
    """Split the audited manifest by patient and write ``out_dir/{train,val,test}.zarr``,
    ``splits.csv`` and ``stats.json``."""
    anon_dir, out_dir = Path(anon_dir), Path(out_dir)
    check_audit(anon_dir)
    manifest = pd.read_csv(anon_dir / "manifest.csv", dtype=str, keep_default_na=False)
    if manifest.empty:
        raise ValueError(f"{anon_dir / 'manifest.csv'} lists no files: check the ingest quarantine list")
    classes = sorted(manifest["label"].unique())
    if len(classes) < 2:
        raise ValueError(f"{anon_dir / 'manifest.csv'}: need at least two classes, found {classes}")
    split = split_patients(manifest, params["split"]["val"], params["split"]["test"], seed)
    manifest["split"] = manifest["patient"].map(split)
    out_dir.mkdir(parents=True, exist_ok=True)

    client = _client(params)
    try:
        for name in SPLITS:
            rows = manifest[manifest["split"] == name].reset_index(drop=True)
            write_split(client, rows, anon_dir / "data", out_dir / f"{name}.zarr", params, classes)
    finally:
        client.close()
        client.cluster.close()

    mean, std = channel_stats(out_dir / "train.zarr")
    import zarr

    for name in SPLITS:
        zarr.open_group(out_dir / f"{name}.zarr", mode="r+").attrs.update({"mean": mean, "std": std})
    counts = {name: manifest[manifest["split"] == name]["label"].value_counts().sort_index().to_dict() for name in SPLITS}
    stats = {
        "classes": classes,
        "channels": channels(params),
        "size": params["size"],
        "mean": mean,
        "std": std,
        "samples": {name: int((manifest["split"] == name).sum()) for name in SPLITS},
        "patients": {name: int(split.eq(name).sum()) for name in SPLITS},
        "per_class": counts,
        "data_manifest_hash": file_hash(anon_dir / "manifest.csv"),
    }
    atomic_write_text(out_dir / "splits.csv", manifest[["file", "patient", "label", "split"]].to_csv(index=False))
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2))
    return stats
