"""Anonymize: de-identify every ingested file into the safe haven, and merge the shards' tables.

DICOM files follow the PS3.15 Annex E *Basic Application Level Confidentiality Profile* with the
options haven needs for research (:mod:`haven.deid.header`, the action table in
:mod:`haven.deid.table`, the options' defaults in the config schema).  Pixel data is copied as read,
except in files that may carry burned-in text (BurnedInAnnotation YES, ultrasound, secondary
captures, ...): :mod:`haven.deid.redact` blacks the text out (configured rectangles, outside the
ultrasound regions, OCR) and re-encodes the pixels as Explicit VR Little Endian, or the file is
quarantined when it cannot be cleaned confidently.  Head volumes are defaced when the project asks
(:mod:`haven.deid.deface`).  Images lose every metadata block (:mod:`haven.deid.images`).

Outputs, each at the path its caller names (the rules: ``anonymize/data/<shard>`` and
``anonymize/shards/<shard>/*.csv``); all written atomically, and a file that cannot be
de-identified safely is quarantined and leaves nothing in the data folder:

* ``<data>/<patient pseudonym>/<new StudyInstanceUID>/<new SOPInstanceUID>.dcm`` and
  ``<data>/I<keyed hash>.<ext>`` for images;
* ``<data>/I<keyed hash>.mask.<png|nii.gz>``: an image's mask (a segmentation project's ingest
  ``mask`` column), re-encoded as its pixels only (:func:`haven.sources.masks.clean_mask`);
* the manifest (``file,kind,patient,study,series,label,sex,age_band,site,modality,role,mask``);
* the log (``input_index,status,output,actions``; no identifiers);
* the quarantine list (``input_index,reason``: the row of the ingest manifest, never the input path).

The result depends only on the inputs and the key: a second run is byte-identical.
"""

from __future__ import annotations

import csv
import heapq
import logging
import os
import stat
from pathlib import Path
from typing import NamedTuple

import pydicom

from haven import keys
from haven.config import section_defaults
from haven.deid import deface, dicomraw
from haven.deid.dicomfile import deidentify_dicom
from haven.deid.errors import AnonymizeError
from haven.deid.images import clean_image
from haven.deid.options import method_values, options as complete_options
from haven.deid.table import option_actions
from haven.deid.volumes import deidentify_volume
from haven.deid.writer import TMP_PREFIX, Meta, method_items, write_bytes, write_dicom
from haven.io import TEXT, atomic_write_text, csv_text, read_rows, write_rows
from haven.progress import progress
from haven.shards import shard_of
from haven.sources.masks import clean_mask, clean_volume_mask

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["file", "kind", "patient", "study", "series", "label", "sex", "age_band", "site",
                    "modality", "role", "mask"]  # role: image or mask (DICOM-SEG); mask: the image's mask file
LOG_COLUMNS = ["input_index", "status", "output", "actions"]
QUARANTINE_COLUMNS = ["input_index", "reason"]  # the index into ingest/manifest.csv: input paths can carry names


# ---------------------------------------------------------------------------------------------
# manifest fields


def age_band(age: str | float | None, width: int | None = None) -> str:
    """``"40-49"`` style band of an age in years (``width``: ``anonymize.age_band_width``); 90 and
    over collapse to ``"90+"``."""
    if width is None:
        width = section_defaults("anonymize")["age_band_width"]
    try:
        years = float(str(age).strip())
    except (TypeError, ValueError):
        return ""
    if years != years or years < 0:  # NaN or negative
        return ""
    if years >= 90:
        return "90+"
    lo = int(years // width) * width
    hi = min(lo + width - 1, 89)
    return f"{lo}-{hi}"


def _sex(value: str) -> str:
    v = (value or "").strip().upper()
    return v if v in ("M", "F", "O") else ""


# ---------------------------------------------------------------------------------------------
# the stage


def _read_manifest(path: Path):
    """The ingest manifest's rows, streamed (a shard job holds only its own rows' results)."""
    if not path.is_file():
        raise FileNotFoundError(f"ingest manifest {path} not found: run `haven ingest` first")

    def rows():
        with open(path, newline="", **TEXT) as fh:  # a path may be any bytes (haven.io.TEXT)
            yield from csv.DictReader(fh)

    return rows()


def _is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (links resolved) lies in ``root`` (already resolved)."""
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False



def anonymize(source: Path, ingest_manifest: Path, key: bytes, *, data: Path, manifest: Path, log_csv: Path,
              quarantine: Path, options: dict | None = None, shard: tuple[int, int] = (0, 1),
              masks: Path | None = None) -> dict:
    """De-identify every row of ``ingest_manifest`` from ``source``: the files into the folder ``data``,
    the tables into ``manifest``, ``log_csv`` and ``quarantine``.

    ``options``: the ``anonymize`` section (what it leaves out comes from the schema's defaults).
    ``shard=(i, n)``: only the rows whose series or path falls in shard i of n
    (:func:`haven.shards.shard_of`); the shards' tables are merged by :func:`merge`.  ``masks``: a
    segmentation project's mask folder (``segmentation.masks``) when it lies outside the source:
    the ingest ``mask`` paths may point into it.
    Returns ``{"inputs": n, "anonymized": n, "quarantined": n}``.
    """
    opts = complete_options(options)
    rows = _read_manifest(Path(ingest_manifest))
    actions = option_actions(opts)  # a broken action table stops the run here, not per file
    data = Path(data)
    data.mkdir(parents=True, exist_ok=True)
    _remove_tmp(data)
    run = _Run(Path(source), data, key, opts, actions, Path(masks) if masks else None)
    part, parts = shard
    inputs = 0
    # the manifest is streamed, so no total; counts only (a row's path can carry names)
    with progress("anonymize", log=log, counts=lambda: {"quarantined": len(run.quarantine)}) as p:
        for index, row in enumerate(rows):
            if parts > 1 and shard_of(_shard_key(row), parts) != part:
                continue
            inputs += 1
            run.add(index, row)
            p.update()
    if opts["deface"]["enabled"]:
        run.deface()
    _remove_stale(data, set(run.produced))
    atomic_write_text(Path(manifest), csv_text(MANIFEST_COLUMNS, run.manifest))
    atomic_write_text(Path(log_csv), csv_text(LOG_COLUMNS, run.log_rows))
    atomic_write_text(Path(quarantine), csv_text(QUARANTINE_COLUMNS, run.quarantine))
    summary = {"inputs": inputs, "anonymized": len(run.manifest), "quarantined": len(run.quarantine)}
    log.info("anonymize: %(inputs)d inputs, %(anonymized)d anonymized, %(quarantined)d quarantined",
             summary)
    return summary


class _Output(NamedTuple):
    """What one input became: its file under the data folder and the manifest fields it gives."""
    rel: str
    changed: int
    study: str
    series: str
    modality: str
    mask: str = ""
    sidecar: str = ""  # a volume's JSON sidecar beside it


class _Run:
    """One anonymize run's state: the rows of its three tables and the outputs produced so far."""

    def __init__(self, source: Path, data: Path, key: bytes, opts: dict, actions: dict[int, str],
                 masks: Path | None = None):
        self.source, self.root, self.data = source, source.resolve(), data
        self.key, self.opts, self.actions = key, opts, actions
        self.mask_root = masks.resolve() if masks is not None else None
        # a DICOM-SEG's pixels are a 1-bit segmentation: no burned-in text to clean
        self.seg_opts = {**opts, "pixels": {**opts["pixels"], "clean": "off"}}
        self.width = int(opts["age_band_width"])
        self.manifest: list[dict] = []
        self.log_rows: list[dict] = []
        self.quarantine: list[dict] = []
        self.produced: dict[str, int] = {}  # output -> input index
        self.uid_cache: dict[str, str] = {}
        self.folders: dict[Path, Path] = {}  # source folder -> resolved
        self.written: set[Path] = set()  # output folders written to

    def add(self, index: int, row: dict) -> None:
        """De-identify the input of row ``index``, or quarantine it (one file never stops the run)."""
        kind = (row.get("kind") or "").strip().lower()
        try:
            out = self._output(row, kind)
        except AnonymizeError as e:
            return self._quarantined(index, str(e))
        except Exception as e:  # the class name carries no PHI
            return self._quarantined(index, f"unexpected error ({type(e).__name__})")
        self.produced[out.rel] = index
        for extra in (out.mask, out.sidecar):
            if extra:
                self.produced[extra] = index
        site = (row.get("site") or "").strip()
        self.manifest.append({
            "file": out.rel,
            "kind": kind,
            "patient": keys.pseudonym(self.key, row.get("patient_id", "")),
            "study": out.study,
            "series": out.series,
            "label": row.get("label", ""),
            "sex": _sex(row.get("sex", "")),
            "age_band": age_band(row.get("age", ""), self.width),
            "site": keys.pseudonym(self.key, site, prefix="S", length=6) if site else "",
            "modality": out.modality,
            "role": (row.get("role") or "").strip() or "image",
            "mask": out.mask,
        })
        self.log_rows.append({"input_index": index, "status": "anonymized", "output": out.rel,
                              "actions": out.changed})

    def _quarantined(self, index: int, reason: str) -> None:
        self.quarantine.append({"input_index": index, "reason": reason})
        self.log_rows.append({"input_index": index, "status": "quarantined", "output": "", "actions": 0})

    def _output(self, row: dict, kind: str) -> _Output:
        rel_in = row.get("path", "")
        src = self.source / rel_in
        inside, is_file = self._locate(src) if rel_in else (False, False)
        if not inside:
            raise AnonymizeError("path outside the source folder")
        if not is_file:
            raise AnonymizeError("input file not found")
        if kind == "dicom":
            return self._dicom(src, row)
        if kind == "nifti":
            return self._volume(src, row)
        if kind == "image":
            mask = self._mask(row.get("mask") or "")  # before any output: a bad mask leaves none
            data, suffix, changed = clean_image(src)
            stem = keys.image_stem(self.key, rel_in)
            rel = stem + suffix
            if rel in self.produced:
                raise AnonymizeError(f"duplicate input (same output as input {self.produced[rel]})")
            write_bytes(data, self.data / rel)
            if mask is None:
                return _Output(rel, changed, "", "", "")
            write_bytes(mask[0], self.data / (stem + ".mask" + mask[1]))
            return _Output(rel, changed, "", "", "", stem + ".mask" + mask[1])
        raise AnonymizeError(f"unknown kind {kind[:16]!r}")

    def _mask(self, rel_mask: str, volume: bool = False) -> tuple[bytes, str] | None:
        """The cleaned bytes and suffix of an image's (``volume``: a volume's) mask (``rel_mask``:
        relative to the source, inside it or the mask folder), None when it has none."""
        if not rel_mask:
            return None
        src = self.source / rel_mask
        if not (_is_inside(src, self.root) or self.mask_root is not None and _is_inside(src, self.mask_root)):
            raise AnonymizeError("mask path outside the source and the mask folder")
        if not src.is_file():
            raise AnonymizeError("mask file not found: re-run ingest")
        try:
            return (clean_volume_mask(src), ".nii.gz") if volume else clean_mask(src)
        except ValueError as e:  # the message names the mask file: a name may be PHI
            raise AnonymizeError(str(e).replace(f"mask {src.name}", "its mask")) from None

    def _locate(self, src: Path) -> tuple[bool, bool]:
        """(whether ``src``, links resolved, lies in the source; whether it is a file), with one
        ``lstat`` for a plain file in a folder seen before (its folder resolved once per run)."""
        try:
            st = os.lstat(src)
        except OSError:
            st = None
        if st is None or stat.S_ISLNK(st.st_mode) or src.name in ("", ".", ".."):
            return _is_inside(src, self.root), src.is_file()
        parent = self.folders.get(src.parent)
        if parent is None:
            parent = self.folders[src.parent] = src.parent.resolve()
        return parent.is_relative_to(self.root), stat.S_ISREG(st.st_mode)

    def _dicom(self, src: Path, row: dict) -> _Output:
        opts = self.seg_opts if (row.get("role") or "").strip() == "mask" else self.opts
        ds, rel, changed, meta = deidentify_dicom(src, row, self.key, opts, self.uid_cache, self.actions)
        if rel in self.produced:
            raise AnonymizeError(f"duplicate SOPInstanceUID (same output as input {self.produced[rel]})")
        target = self.data / rel
        known = target.parent in self.written
        created = [] if known else [p for p in (target.parent.parent, target.parent) if not p.exists()]
        try:
            write_dicom(ds, target, meta, folder_exists=known)
        except BaseException:
            for p in reversed(created):
                _rmdir_quiet(p)
            raise
        self.written.add(target.parent)
        # the new UIDs as written in the file (= keys.uid of the originals)
        return _Output(rel, changed, dicomraw.text(ds, 0x0020000D), dicomraw.text(ds, 0x0020000E),
                       row.get("modality", ""))

    def _volume(self, src: Path, row: dict) -> _Output:
        mask = self._mask(row.get("mask") or "", volume=True)  # before any output: a bad mask leaves none
        out = deidentify_volume(src, row, self.key, self.opts, self.source)
        if out.rel in self.produced:
            raise AnonymizeError(f"duplicate volume (same output as input {self.produced[out.rel]})")
        stem = out.rel[: -len(".nii.gz")]
        side = stem + ".json" if out.sidecar is not None else ""
        write_bytes(out.volume, self.data / out.rel)
        if side:
            write_bytes(out.sidecar, self.data / side)
        if mask is not None:
            write_bytes(mask[0], self.data / (stem + ".mask.nii.gz"))
        if out.defaced is not None:
            log.info("defaced a %s volume: %d voxels removed", row.get("modality", ""), out.defaced)
        return _Output(out.rel, out.changed, out.session, "", row.get("modality", ""),
                       mask=stem + ".mask.nii.gz" if mask is not None else "", sidecar=side)

    def deface(self) -> None:
        """Deface the head volumes among the outputs; a series that fails is quarantined whole."""
        failed = _deface_series(self.data, self.manifest, self.opts)
        if not failed:
            return
        gone = {self.produced.pop(rel): reason for rel, reason in failed.items()}
        self.manifest = [m for m in self.manifest if m["file"] not in failed]
        for r in self.log_rows:
            if r["input_index"] in gone:
                r.update(status="quarantined", output="", actions=0)
        self.quarantine.extend({"input_index": i, "reason": reason} for i, reason in gone.items())
        self.quarantine.sort(key=lambda q: q["input_index"])


def _shard_key(row: dict) -> str:
    """What decides a file's shard: its series (a series is never split between shard jobs, so a
    head volume is defaced whole), else its path."""
    series = (row.get("series_uid") or "").strip()
    if series and (row.get("kind") or "").strip().lower() == "dicom":
        return "series:" + series
    return row.get("path", "")


def _deface_series(data_dir: Path, manifest: list[dict], opts: dict) -> dict[str, str]:
    """Deface the head volumes among this run's outputs (:mod:`haven.deid.deface`), rewriting their
    files; returns ``{output: reason}`` for the files of series that could not be defaced."""
    dopts = opts["deface"]
    groups = deface.candidates(manifest, dopts)
    failed: dict[str, str] = {}
    for series, files in sorted(groups.items()):
        try:
            headers = [pydicom.dcmread(data_dir / f, stop_before_pixels=True) for f in files]
            if deface.slices(headers) < int(dopts["min_slices"]):
                continue  # a few slices are not a volume a face can be rendered from
            if not any(deface.applies(ds, dopts) for ds in headers):
                continue
            datasets = [pydicom.dcmread(data_dir / f) for f in files]
            removed = deface.deface(datasets, dopts)
            for f, ds in zip(files, datasets):
                _mark_defaced(ds)
                write_dicom(ds, data_dir / f, Meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                                     str(ds.file_meta.TransferSyntaxUID)))
            log.info("defaced a %d-slice %s volume: %d voxels removed", deface.slices(headers),
                     datasets[0].get("Modality", ""), removed)
        except (deface.DefaceError, AnonymizeError) as e:
            failed.update({f: f"defacing: {e}" for f in files})
        except Exception as e:  # one series never stops the run; the class name carries no PHI
            failed.update({f: f"defacing failed ({type(e).__name__})" for f in files})
    for f in failed:
        (data_dir / f).unlink(missing_ok=True)
    return failed


def _mark_defaced(ds) -> None:
    """Record the Clean Recognizable Visual Features option in a defaced file's method codes and text
    (RecognizableVisualFeatures is set by :func:`haven.deid.deface.deface`)."""
    codes = [(str(i.CodeValue), str(i.CodeMeaning)) for i in ds.get("DeidentificationMethodCodeSequence", [])]
    if deface.CODE not in codes:
        codes.append(deface.CODE)
    ds.DeidentificationMethodCodeSequence = method_items(codes)
    ds.DeidentificationMethod = method_values(codes)


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _remove_tmp(data_dir: Path) -> None:
    """Temporary files left by a killed run."""
    for p in data_dir.rglob(TMP_PREFIX + "*"):
        if p.is_file():
            p.unlink(missing_ok=True)


def _remove_stale(data_dir: Path, produced: set[str]) -> None:
    """Outputs of an earlier run that this run did not produce (and emptied folders)."""
    for p in sorted(data_dir.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        rel = p.relative_to(data_dir).as_posix()
        if p.is_file() or p.is_symlink():
            if rel not in produced:
                p.unlink(missing_ok=True)
        elif p.is_dir():
            _rmdir_quiet(p)


# ---------------------------------------------------------------------------------------------
# merging the shards' tables


class ShardTables(NamedTuple):
    """One anonymize shard's tables, and the name of its data folder beside the others' (the prefix
    of its files' paths in the merged tables)."""
    name: str
    manifest: Path
    log_csv: Path
    quarantine: Path


def merge(shards: list[ShardTables], *, manifest: Path, log_csv: Path, quarantine: Path) -> dict:
    """The anonymize shards' tables as one ``manifest``, ``log_csv`` and ``quarantine``, streamed.
    A shard's paths get its data folder's name as prefix; rows are ordered by the input's row in
    the ingest manifest (each shard's tables already are)."""
    shards = [ShardTables(s.name, Path(s.manifest), Path(s.log_csv), Path(s.quarantine)) for s in shards]
    for s in shards:
        for path in (s.manifest, s.log_csv, s.quarantine):
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing: re-run the anonymize shard that writes it")

    def index(row) -> int:
        return int(row["input_index"])

    def logs(s: ShardTables):
        for row in read_rows(s.log_csv):
            if row["output"]:
                row["output"] = f"{s.name}/{row['output']}"
            yield row

    def rows(s: ShardTables):
        # the shard's manifest lists its anonymized inputs in the order of its log
        done = (index(r) for r in read_rows(s.log_csv) if r["status"] == "anonymized")
        for at, row in zip(done, read_rows(s.manifest)):
            mask = row.get("mask") or ""
            yield at, {**row, "file": f"{s.name}/{row['file']}", "mask": f"{s.name}/{mask}" if mask else ""}

    n = write_rows(Path(manifest), MANIFEST_COLUMNS,
                   (row for _, row in heapq.merge(*(rows(s) for s in shards), key=lambda t: t[0])))
    write_rows(Path(log_csv), LOG_COLUMNS, heapq.merge(*(logs(s) for s in shards), key=index))
    q = write_rows(Path(quarantine), QUARANTINE_COLUMNS,
                   heapq.merge(*(read_rows(s.quarantine) for s in shards), key=index))
    return {"shards": len(shards), "anonymized": n, "quarantined": q}
