"""The ingest stage: walk a source folder, read every file of the shard, write the three tables.

Reading a file is its reader's business (:func:`haven.sources.read_header`); here are the walk,
the labels, the duplicate check and the bookkeeping of what was accepted or quarantined and why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from haven import sources
from haven.ingest.labels import Labels
from haven.ingest.tables import IDENTIFIER_COLUMNS, MANIFEST_COLUMNS, QUARANTINE_COLUMNS, Tables
from haven.io import atomic_write_text, csv_text
from haven.progress import progress
from haven.shards import shard_of
from haven.sources import bids
from haven.sources.base import Quarantine
from haven.sources.masks import is_mask_name, mask_for, read_mask, read_volume_mask

log = logging.getLogger(__name__)


def ingest(source: Path, out: Path | Tables, labels: Path | None = None, label_key: str | None = None,
           label_column: str | None = None, *, check_pixels: bool = True, shard: tuple[int, int] = (0, 1),
           labels_required: bool = True, label_folders: bool = True, segmentation: dict | None = None) -> dict:
    """Walk ``source`` into the manifest, identifiers and quarantine list of ``out`` (:class:`Tables`,
    or a folder: its ``{manifest,identifiers,quarantine}.csv``).

    Labels (:mod:`haven.ingest.labels`): without a label table every file's label is the name of
    its parent folder; with ``labels`` (a CSV), ``label_key`` names the manifest field it is keyed
    by (``accession``, ``patient_id`` or ``path``; None: the table's first column if it is one of
    these) and ``label_column`` the label (None: the schema's default).  ``check_pixels`` decodes
    every DICOM's pixel data once so that undecodable files are quarantined here rather than later.
    ``shard=(i, n)`` reads only the files of shard i of n (:func:`haven.shards.shard_of`); the
    shards' outputs are merged by :func:`haven.ingest.merge_ingest`.  ``labels_required=False``
    (a de-identification-only project, ``until: audit``): a file without a label is ingested with
    an empty one instead of being quarantined; ``label_folders=False`` (unlabeled data) looks for
    no label in folder names at all.  ``segmentation`` (a segmentation project's task options:
    ``masks``, ``mask_suffix``): each image's mask file goes into the manifest's ``mask`` column
    (:class:`_Masks`), and mask files are not samples.

    Returns ``{"files", "accepted", "quarantined", "patients"}``.
    """
    source, out = Path(source), Tables.of(out)
    if not source.is_dir():
        raise ValueError(f"source {source} is not a folder: fix `source` in the config")
    if label_column is None:
        from haven.config import section_defaults

        label_column = section_defaults("label_column")
    labeller = Labels(labels, label_key, label_column, required=labels_required, folders=label_folders)
    # outputs written inside the source are not part of it
    root = source.resolve()
    skip = {p for p in (Path(f).parent.resolve() for f in (out.manifest, out.identifiers, out.quarantine))
            if p.is_relative_to(root)}
    index, shards = shard
    keep = (lambda rel: shard_of(rel, shards) == index) if shards > 1 else None
    masks = _Masks(source, segmentation) if segmentation is not None else None
    if masks is not None:
        skip |= masks.skip(root)
    files = [f for f in _iter_files(source, skip, keep) if masks is None or not masks.is_mask(f[1])]

    manifest, quarantine, identifiers = _read_all(files, labeller, check_pixels, masks)

    atomic_write_text(out.manifest, csv_text(MANIFEST_COLUMNS, manifest))
    atomic_write_text(out.identifiers, csv_text(IDENTIFIER_COLUMNS, identifiers))
    atomic_write_text(out.quarantine, csv_text(QUARANTINE_COLUMNS, quarantine))
    summary = {
        "files": len(manifest) + len(quarantine),
        "accepted": len(manifest),
        "quarantined": len(quarantine),
        "patients": len({r["patient_id"] for r in manifest if r.get("role") != "mask"}),  # patients with a sample
    }
    log.info("ingest %s: %d files, %d accepted, %d quarantined, %d patients", source,
             summary["files"], summary["accepted"], summary["quarantined"], summary["patients"])
    if quarantine and not manifest and all(q["reason"].startswith("no label") for q in quarantine):
        log.warning("ingest %s: every file was quarantined for want of a label: give class folders or a label "
                    "table (`labels`), or set `until: audit` in the project to de-identify unlabeled data", source)
    return summary


def _read_all(files, labeller: Labels, check_pixels: bool, masks: "_Masks | None" = None
              ) -> tuple[list[dict], list[dict], list[dict]]:
    """(manifest rows, quarantine rows, identifier rows) of the walk's ``files``."""
    manifest: list[dict] = []
    quarantine: list[dict] = []
    identifiers: list[dict] = []
    seen_ids: set[tuple[str, str, str]] = set()
    seen_sops: dict[str, str] = {}
    # counts only: the walk's paths can carry names and never reach the bar or the log
    with sources.quiet(), progress("ingest", len(files), log=log,
                                   counts=lambda: {"quarantined": len(quarantine)}) as p:
        for path, rel, problem in p.track(files):
            try:
                if problem:
                    raise Quarantine(problem)
                row, ids = sources.read_header(path, rel, check_pixels)
                row["role"] = row.get("role") or "image"
                if row["role"] == "mask":
                    _label_of_mask(labeller, row, ids)
                else:
                    labeller.apply(row, ids)
                    if masks is not None:
                        masks.apply(row)
                sop = row["sop_uid"]
                if sop and sop in seen_sops:
                    # the same instance twice (a copy, a link): downstream names derive from its UID
                    raise Quarantine(f"duplicate: same SOPInstanceUID as {seen_sops[sop]}")
                if sop:
                    seen_sops[sop] = rel
            except Quarantine as q:
                quarantine.append({"path": rel, "reason": str(q)})
                continue
            except Exception as e:  # never crash on one file
                quarantine.append({"path": rel, "reason": sources.reason(e, path)})
                continue
            manifest.append(row)
            pid = row["patient_id"]
            for tag, value in ids:
                if (pid, tag, value) not in seen_ids:
                    seen_ids.add((pid, tag, value))
                    identifiers.append({"patient_id": pid, "tag": tag, "value": value})
    return manifest, quarantine, identifiers


def _label_of_mask(labeller: Labels, row: dict, ids: list) -> None:
    """A mask object (DICOM-SEG) is no sample: it takes a label where there is one, else none; but
    where a label table names the cohort, the SEG of a patient it leaves out goes with that
    patient's images (quarantined: nothing of them travels on)."""
    try:
        labeller.apply(row, ids)
    except Quarantine:
        if labeller.table is not None:
            raise
        row["label"] = ""


class _Masks:
    """Where a segmentation project's image masks lie: a folder mirroring the source's relative
    paths (``masks``), else beside each image as ``<stem><mask_suffix>.<ext>``
    (:mod:`haven.sources.masks`)."""

    def __init__(self, source: Path, options: dict):
        self.source = source
        folder = options.get("masks")
        self.folder = Path(folder) if folder else None
        self.suffix = "" if self.folder is not None else options.get("mask_suffix") or "_mask"
        if self.folder is not None and not self.folder.is_dir():
            raise ValueError(f"mask folder {self.folder} is not a folder: fix `segmentation.masks` in the config")

    def skip(self, root: Path) -> set[Path]:
        """The mask folder when it lies inside the source (resolved ``root``): not walked for samples."""
        if self.folder is not None and self.folder.resolve().is_relative_to(root):
            return {self.folder.resolve()}
        return set()

    def is_mask(self, rel: str) -> bool:
        return bool(self.suffix) and is_mask_name(rel, self.suffix)

    def apply(self, row: dict) -> None:
        """Set an image row's ``mask`` (relative to the source; "" = none, all background), or
        Quarantine the image when its mask cannot be read or is not its size."""
        row["mask"] = ""
        if row["kind"] not in ("image", "nifti"):
            return
        found = mask_for(row["path"], self.source, self.folder, self.suffix)
        if found is None:
            return
        volume = row["kind"] == "nifti"
        try:
            shape = (read_volume_mask if volume else read_mask)(found).shape
        except ValueError as e:  # the message names the mask file: a name may be PHI
            raise Quarantine(str(e).replace(f"mask {found.name}", "its mask")) from None
        if volume and "x".join(map(str, shape)) != row["shape"]:
            raise Quarantine(f"its mask is {'x'.join(map(str, shape))} voxels but the volume is {row['shape']}: "
                             "give a mask on the volume's own grid")
        if not volume and shape != (int(row["rows"]), int(row["cols"])):
            raise Quarantine(f"its mask is {shape[0]}x{shape[1]} but the image is {row['rows']}x{row['cols']} "
                             "(rows x columns): give a mask of the image's size")
        row["mask"] = Path(os.path.relpath(found, self.source)).as_posix()


def _iter_files(source: Path, skip: set[Path], keep=None):
    """(path, relative posix path, symlink problem or None), sorted, hidden names and the folders
    ``skip`` (resolved) skipped, and in a BIDS dataset its folders that are not raw data and its
    metadata files (:mod:`haven.sources.bids`); with ``keep(rel)`` only those paths (a shard's files: the others
    are not even stat'ed)."""
    root = source.resolve()
    found = []

    def walk(folder: str, prefix: str, in_bids: bool) -> None:
        with os.scandir(folder) as it:
            entries = list(it)
        names = {e.name for e in entries}
        top = bids.DESCRIPTION in names  # a BIDS dataset's root: only its raw data are samples
        in_bids = in_bids or top
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = prefix + e.name
            if e.is_dir(follow_symlinks=False):
                if skip and Path(e.path).resolve() in skip or top and e.name in bids.NOT_RAW:
                    continue
                walk(e.path, rel + "/", in_bids)
                continue
            if bids.is_companion(e.name, names, in_bids):
                continue  # a sidecar or table: read through the volumes it describes
            if keep is not None and not keep(rel):
                continue
            problem = None
            if e.is_symlink():
                try:
                    target = Path(e.path).resolve(strict=True)
                except (OSError, RuntimeError):
                    problem = "broken symbolic link"
                else:
                    if target.is_dir():
                        problem = "symbolic link to a folder: not followed"
                    elif not target.is_relative_to(root):
                        problem = "symbolic link to a file outside the source: not followed"
                    elif not target.is_file():
                        problem = "symbolic link to something that is not a file"
            elif not e.is_file(follow_symlinks=False):
                problem = "not a regular file"
            found.append((Path(e.path), rel, problem))

    walk(str(source), "", False)
    found.sort(key=lambda r: r[1])
    return found
