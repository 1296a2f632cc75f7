"""De-identify one NIfTI volume: keyed BIDS names, a fresh header, a clean sidecar, the face cut.

* **Names.** The output is a BIDS path of pseudonyms: ``sub-<P>/[ses-<S>/]<datatype>/sub-<P>
  [_ses-<S>][_<entity>-<value>...]_<suffix>.nii.gz``, ``P`` the patient's keyed pseudonym (the
  manifest's ``patient``, as for DICOM), ``S`` a keyed pseudonym of the session (a session label
  is often the scan date); other entities keep their labels when they are plain words or small
  numbers (``acq-mprage``, ``run-1``) and are keyed otherwise.  A volume outside a BIDS dataset
  becomes ``sub-<P>/anat/I<keyed hash>.nii.gz``.
* **Header.** A new header of the input's NIfTI version carrying only geometry and numbers (shape,
  voxel sizes and units, qform/sform and their codes, data type, scaling, intent code, slice
  timing fields, display range); every text field is empty but ``descrip``, which says what haven
  did (:data:`MARK`, :data:`MARK_DEFACED`: the audit's proof of defacing), and no extension is
  copied (they can hold whole DICOM headers).  The voxels are written as stored.
* **Sidecar.** The volume's metadata (inherited, :func:`haven.sources.bids.sidecar`) cleaned by
  :mod:`haven.deid.sidecar`, dates shifted by the patient's day shift, written beside it.
* **Face.** Head MR volumes (:func:`defaces`) are defaced by :func:`haven.deid.deface.deface_array`
  (Quickshear's plane below BET's brain); one that cannot be is quarantined.

Bytes are deterministic: gzip without a time stamp, JSON with sorted keys.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from haven import keys
from haven.deid import deface, sidecar
from haven.deid.errors import AnonymizeError
from haven.sources import bids
from haven.sources.nifti import MR_SUFFIXES, header_texts

MARK = "haven: de-identified"
MARK_DEFACED = "haven: de-identified, defaced (113102)"
MARKS = frozenset({MARK, MARK_DEFACED})
DATATYPES = frozenset({"anat", "func", "dwi", "fmap", "perf", "pet", "micr", "nirs", "motion"})
_PLAIN = re.compile(r"[A-Za-z]{1,16}|\d{1,3}|[A-Za-z]{1,12}\d{1,3}")
_SUFFIX = re.compile(r"[A-Za-z0-9]{1,24}")
# header fields copied as numbers (the rest of a fresh header is nibabel's defaults)
_NUMBERS = ("intent_code", "intent_p1", "intent_p2", "intent_p3", "slice_start", "slice_end", "slice_code",
            "slice_duration", "toffset", "cal_min", "cal_max", "dim_info")


class VolumeOutput(NamedTuple):
    rel: str  # the volume's output path (relative to the data folder)
    volume: bytes
    sidecar: bytes | None  # the cleaned JSON, None without metadata
    changed: int  # header fields, extensions and sidecar keys removed or changed
    session: str  # the session's pseudonym ("" without one): the manifest's study
    defaced: int | None  # voxels removed by defacing, None when not a head volume


def output_name(row: dict, key: bytes) -> tuple[str, str]:
    """(relative output path, session pseudonym) of the volume of an ingest manifest ``row``."""
    patient = keys.pseudonym(key, row.get("patient_id", ""))
    rel_in = row.get("path", "")
    name = PurePosixPath(rel_in).name
    session = (row.get("session") or "").strip()
    ses = keys.pseudonym(key, row.get("patient_id", "") + "/" + session, prefix="S", length=8) if session else ""
    if not row.get("patient_id", "").startswith("sub-"):
        return f"sub-{patient}/anat/{keys.image_stem(key, rel_in)}.nii.gz", ses
    parts = [f"sub-{patient}"] + ([f"ses-{ses}"] if ses else [])
    pieces = bids.stem(name).split("_")
    for piece in pieces[:-1]:
        entity, _, label = piece.partition("-")
        if entity in ("sub", "ses") or not label:
            continue
        plain = _PLAIN.fullmatch(label) and entity.isalpha()
        parts.append(f"{entity}-{label}" if plain else
                     f"{entity if entity.isalpha() else 'x'}-{keys.pseudonym(key, piece, prefix='K', length=6)}")
    suffix = pieces[-1] if _SUFFIX.fullmatch(pieces[-1]) else "volume"
    parent = PurePosixPath(rel_in).parent.name
    datatype = parent if parent in DATATYPES else "anat"
    folder = f"sub-{patient}/" + (f"ses-{ses}/" if ses else "") + datatype
    return f"{folder}/{'_'.join(parts)}_{suffix}.nii.gz", ses


def defaces(row: dict, meta: dict, opts: dict) -> bool:
    """Whether a volume is a head volume the project defaces: a 3-D MR (or a listed modality) of
    a head suffix, in a project that defaces volumes (``deface.volumes``, on by default, or
    ``deface.enabled``); the sidecar's BodyPartExamined/BodyPart, when given, must be a head."""
    if not (opts.get("volumes") or opts.get("enabled")):
        return False
    modality = (row.get("modality") or "").upper()
    if modality not in opts["modalities"]:
        return False
    if modality == "MR" and row.get("suffix") and row["suffix"] not in MR_SUFFIXES:
        return False
    part = str(meta.get("BodyPartExamined") or meta.get("BodyPart") or "").strip().upper()
    if not part:
        return opts["missing_body_part"] == "deface"
    return part in opts["body_parts"]


def _fresh_header(img, descrip: str):
    """A new header of ``img``'s class holding only its geometry and numbers, ``descrip`` its text."""
    old = img.header
    hdr = type(old)()
    hdr.set_data_dtype(old.get_data_dtype())
    hdr.set_data_shape(img.shape)
    hdr.set_zooms(old.get_zooms())
    hdr.set_xyzt_units(*old.get_xyzt_units())
    for form, setter in (("qform", hdr.set_qform), ("sform", hdr.set_sform)):
        affine, code = getattr(old, f"get_{form}")(coded=True)
        if affine is not None and int(code):
            setter(affine, int(code))
    if not int(old["qform_code"]) and not int(old["sform_code"]):
        hdr.set_sform(img.affine, 0)  # an ANALYZE-style header: its affine is the voxel sizes
    for field in _NUMBERS:
        hdr[field] = old[field]
    hdr["descrip"] = descrip.encode("ascii")
    return hdr


def deidentify_volume(src: Path, row: dict, key: bytes, opts: dict, source_root: Path) -> VolumeOutput:
    """De-identify the NIfTI volume ``src`` (its ingest manifest ``row``) under the complete
    anonymize options ``opts``; raises :class:`AnonymizeError` with a PHI-free reason."""
    import nibabel as nib

    try:
        img = nib.load(str(src))
        stored = np.asanyarray(img.dataobj.get_unscaled())
    except Exception as e:
        raise AnonymizeError(f"NIfTI volume not readable ({type(e).__name__})") from None
    try:
        meta = bids.sidecar(src, bids.root_of(src, source_root))
    except ValueError:  # the message names the sidecar: a name may be PHI
        raise AnonymizeError("its JSON sidecar is not readable: fix or remove it, then re-run ingest") from None
    rel, ses = output_name(row, key)
    removed = None
    dopts = deface.options(opts["deface"])
    if defaces(row, meta, dopts) and _is_volume(stored.shape, dopts):
        stored, removed = _deface(img, stored, row, dopts)
    hdr = _fresh_header(img, MARK if removed is None else MARK_DEFACED)
    slope, inter = img.dataobj.slope, img.dataobj.inter
    hdr.set_slope_inter(slope if np.isfinite(slope) and slope != 1 else None,
                        inter if np.isfinite(inter) and inter != 0 else None)
    out = type(img)(stored, None, hdr)
    volume = gzip.compress(out.to_bytes(), compresslevel=1, mtime=0)  # nibabel's level: 6 took 4x as long
    changed = len(header_texts(img.header)) + len(img.header.extensions)
    side = None
    if meta:
        days = keys.day_shift(key, row.get("patient_id", ""), int(opts["max_shift_days"])) \
            if opts["retain_longitudinal_modified_dates"] else None
        clean, n = sidecar.clean(meta, days)
        changed += n
        side = (json.dumps(clean, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    return VolumeOutput(rel, volume, side, changed, ses, removed)


def _is_volume(shape: tuple, dopts: dict) -> bool:
    """3-D with enough slices along every axis for a face to be rendered (``min_slices``)."""
    return len(shape) == 3 and min(shape) >= int(dopts["min_slices"])


def check_defaced(data: Path, manifest: list[dict], deface_options: dict) -> list[dict]:
    """The audit's findings for the NIfTI volumes of an anonymize ``manifest`` that should have
    been defaced (:func:`defaces`, from the output's name and sidecar) and do not carry
    :data:`MARK_DEFACED`."""
    import nibabel as nib

    from haven.sources.bids import entities

    dopts = deface.options(deface_options)
    findings = []
    for row in manifest:
        if row.get("kind") != "nifti":
            continue
        path = data / row["file"]
        side = path.with_name(bids.stem(path.name) + ".json")
        try:
            meta = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
            img = nib.load(str(path))
            descrip = img.header["descrip"].item().split(b"\x00")[0].decode("latin-1")
        except Exception as e:
            findings.append({"file": row["file"], "where": "file", "kind": f"unreadable ({type(e).__name__})"})
            continue
        suffix = entities(path.name).get("suffix", "") if path.name.startswith("sub-") else ""
        wanted = defaces({"modality": row.get("modality", ""), "suffix": suffix}, meta, dopts)
        if wanted and _is_volume(img.shape, dopts) and descrip != MARK_DEFACED:
            findings.append({"file": row["file"], "where": "NIfTI descrip", "kind": "head volume not defaced"})
    return findings


def _deface(img, stored: np.ndarray, row: dict, dopts: dict) -> tuple[np.ndarray, int]:
    """The stored voxels with the face set to the volume's minimum, and how many were removed."""
    scaled = np.asanyarray(img.dataobj, dtype=np.float32)
    try:
        defaced, removed = deface.deface_array(scaled, img.affine, row.get("modality") or "MR", dopts)
    except deface.DefaceError as e:
        raise AnonymizeError(f"defacing: {e}") from None
    except Exception as e:  # the class name carries no PHI
        raise AnonymizeError(f"defacing failed ({type(e).__name__})") from None
    cut = defaced != scaled
    out = np.array(stored, copy=True)
    out[cut] = stored.min()
    return out, removed
