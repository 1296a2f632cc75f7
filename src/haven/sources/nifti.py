"""NIfTI volumes (``.nii``, ``.nii.gz``; NIfTI-1 and -2), alone or in a BIDS dataset, read by nibabel.

One file is one volume and one manifest row.  Its fields:

* ``patient_id``: in a BIDS dataset ``sub-<label>`` (``participants.tsv``'s key), else the file's
  path without its extension (as for plain images);
* ``session`` (``ses-<label>`` or ""), ``suffix`` (BIDS suffix: T1w, FLAIR, ...), ``shape``
  (``X x Y x Z``), ``spacing`` (mm), ``orientation`` (nibabel's axis codes, e.g. ``RAS``);
* ``modality``: the sidecar's ``Modality`` where a converter wrote one, else MR for the MR
  suffixes of BIDS' ``anat`` datatype;
* ``sex``, ``age``, ``site``: the subject's ``participants.tsv`` row, else the sidecar
  (``PatientSex``, ``PatientAge``, ``InstitutionName``).

The identifying values the audit searches for (:func:`header_identifiers`,
:func:`haven.deid.sidecar.identifiers`): the header's text fields (``descrip``, ``aux_file``,
``intent_name``, ``db_name``), the text of its extensions (a DICOM extension's header as DICOM
identifiers; a JSON one value by value), the sidecar's identifying keys, the subject and session
labels in the names, and the participants row's other columns (names, record numbers, birth dates
a site left in the table).
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

import numpy as np

from haven.sources import bids
from haven.sources.base import BY_CONTENT, BY_NAME, HEADER_FIELDS, NO, Quarantine, Reader

SUFFIXES = frozenset({".nii", ".nii.gz"})
TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")
# BIDS anat suffixes that are MR images (BIDS 1.9 appendix, "anat" datatype)
MR_SUFFIXES = frozenset({"T1w", "T2w", "PDw", "T2starw", "FLAIR", "inplaneT1", "inplaneT2", "PDT2", "angio",
                         "T1map", "T2map", "T2starmap", "R1map", "R2map", "PDmap", "MTRmap", "UNIT1", "MP2RAGE",
                         "MESE", "MEGRE", "VFA", "IRT1", "MPM", "MTS", "MTR", "bold", "dwi", "sbref", "epi",
                         "m0scan", "asl"})
# participants.tsv columns that become manifest fields (the rest are recorded as identifiers)
PARTICIPANT_FIELDS = {"sex": "sex", "gender": "sex", "age": "age", "site": "site"}
_SAFE_LABEL = re.compile(r"[A-Za-z]{0,12}\d{0,3}")  # "01", "pre", "baseline2": no date, no record number


def volume_fields(img) -> dict:
    """``shape``, ``spacing`` and ``orientation`` of a nibabel image (3 spatial axes)."""
    import nibabel as nib

    zooms = img.header.get_zooms()[:3]
    return {"shape": "x".join(str(int(n)) for n in img.shape[:3]),
            "spacing": "x".join(f"{float(z):.4g}" for z in zooms),
            "orientation": "".join(nib.aff2axcodes(img.affine))}


def _text(raw) -> str:
    raw = raw.item() if hasattr(raw, "item") else raw
    if isinstance(raw, bytes):
        raw = raw.split(b"\x00")[0].decode("latin-1")
    return str(raw).strip()


def header_texts(header) -> list[tuple[str, str]]:
    """(field, text) of a NIfTI header's non-empty text fields."""
    out = []
    for field in TEXT_FIELDS:
        if field in header:
            text = _text(header[field])
            if text:
                out.append((field, text))
    return out


def extension_identifiers(header) -> list[tuple[str, str]]:
    """(place, value) of the identifying text in a header's extensions: a DICOM extension (code 2)
    as DICOM identifiers, a JSON one value by value, anything else as its printable text."""
    out: list[tuple[str, str]] = []
    for i, ext in enumerate(header.extensions):
        code = int(ext.get_code())
        raw = ext.get_content() if code != 2 else getattr(ext, "_raw_content", None)
        raw = raw if isinstance(raw, (bytes, bytearray)) else getattr(ext, "content", b"")
        where = f"nifti.extension{i}"
        if code == 2:
            out.extend(_dicom_extension(bytes(raw), where))
            continue
        text = bytes(raw).split(b"\x00")[0].decode("utf-8", "replace").strip()
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, (dict, list)):
            out.extend((f"{where}.{k}", v) for k, v in _json_strings(value))
        elif text:
            out.append((f"{where}.text", text[:1024]))
    return out


def _dicom_extension(raw: bytes, where: str) -> list[tuple[str, str]]:
    """A DICOM extension's header (a dataset without preamble, explicit or implicit VR)."""
    import io

    import pydicom

    from haven.sources.dicomheader import identifiers

    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
        return [(f"{where}.{tag}", value) for tag, value in identifiers(ds)]
    except Exception:  # unreadable: its printable text, whole
        text = re.sub(rb"[^\x20-\x7e]+", b" ", raw).decode("ascii").strip()
        return [(f"{where}.text", text[:1024])] if text else []


def _json_strings(value, key: str = ""):
    """(key, string) of every string (and number-like id) in a JSON value, recursively."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_strings(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v, key)
    elif isinstance(value, str) and value.strip():
        yield key or "value", value.strip()


def label_identifiers(ents: dict) -> list[tuple[str, str]]:
    """The subject label (bare, as in the names) and a session label that is not a plain
    ordinal (``ses-20190304`` is a scan date) as identifiers."""
    out = []
    if ents.get("subject"):
        out.append(("BIDS.subject", ents["subject"]))
    session = ents.get("session", "")
    if session and not _SAFE_LABEL.fullmatch(session):
        out.append(("BIDS.session", f"ses-{session}"))
        out.append(("BIDS.session_label", session))
    return out


class NiftiReader(Reader):
    kind = "nifti"
    description = "a NIfTI volume (nii, nii.gz)"
    suffixes = SUFFIXES

    def recognise(self, head: bytes, suffix: str, others: frozenset[str]) -> int:
        if suffix not in SUFFIXES:
            return NO
        if suffix == ".nii" and len(head) >= 4 and (int.from_bytes(head[:4], "little") in (348, 540)
                                                    or int.from_bytes(head[:4], "big") in (348, 540)):
            return BY_CONTENT
        return BY_NAME

    def misnamed(self, head: bytes, suffix: str) -> str | None:
        # sizeof_hdr (348: NIfTI-1, 540: NIfTI-2) and the magic at byte 344 / 4 are beyond 132 bytes
        # for NIfTI-1; the size alone is a weak sign, so only a file no other reader took gets here
        if len(head) >= 4 and int.from_bytes(head[:4], "little") in (348, 540) and suffix not in (".hdr", ".img"):
            return f"a NIfTI volume with a {suffix or 'missing'} extension: rename it to .nii to use it"
        return None

    def header(self, path: Path, rel: str, fh, head: bytes, *, check_pixels: bool):
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as e:
            raise Quarantine(f"not a readable NIfTI volume ({type(e).__name__}): re-export it "
                             "(e.g. dcm2niix) or remove it") from None
        if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
            raise Quarantine(f"a {len(img.shape)}-D NIfTI image (shape {'x'.join(map(str, img.shape))}): "
                             "haven reads 3-D volumes; split a 4-D series into volumes (fslsplit) or leave it out")
        if check_pixels:
            try:
                np.asanyarray(img.dataobj)  # a truncated .nii.gz fails here, not in preprocess
            except Exception as e:
                raise Quarantine(f"the volume's voxels cannot be read ({type(e).__name__}: truncated?): "
                                 "copy the file again or remove it") from None
        source = path.parents[len(PurePosixPath(rel).parts) - 1]  # the folder ``rel`` is relative to
        root = bids.root_of(path, source)
        ents = bids.entities(path.name) if root is not None else {}
        try:
            return self._fields(img, rel, ents, bids.sidecar(path, root), root)
        except ValueError as e:  # a bad sidecar or participants.tsv: the message names it and the fix
            raise Quarantine(str(e)) from None

    def pixels(self, path: Path, mode: str, windows: list[dict]) -> np.ndarray:
        """Not a 2-D image: a volume project preprocesses volumes whole (``haven.learn.volumes``)."""
        raise ValueError(f"{path.name} is a 3-D volume: a 2-D project cannot train on it; use a volume project "
                         "(preprocess.dims: 3) or leave NIfTI files out of this source")

    def _fields(self, img, rel: str, ents: dict, meta: dict, root: Path | None):
        from haven.deid.sidecar import identifiers as sidecar_identifiers

        row = dict.fromkeys(HEADER_FIELDS, "")
        row.update(volume_fields(img))
        suffix = ents.get("suffix", "")
        row["suffix"] = suffix
        ids = [(f"nifti.{f}", t) for f, t in header_texts(img.header)] + extension_identifiers(img.header)
        ids += sidecar_identifiers(meta)
        if ents.get("subject"):
            row["patient_id"] = f"sub-{ents['subject']}"
            row["session"] = f"ses-{ents['session']}" if ents.get("session") else ""
            ids += label_identifiers(ents)
        else:
            row["patient_id"] = bids.stem(rel)
        modality = str(meta.get("Modality", "") or "").strip().upper()
        row["modality"] = modality or ("MR" if suffix in MR_SUFFIXES else "")
        row["sex"] = str(meta.get("PatientSex", "") or "")
        row["age"] = str(meta.get("PatientAge", "") or "").rstrip("Yy")
        row["site"] = str(meta.get("InstitutionName", "") or "")
        if root is not None and ents.get("subject"):
            table, identifying = bids.participants(root)
            ids += _participant(row, table.get(row["patient_id"], {}), identifying)
        return row, ids


def _participant(row: dict, person: dict, identifying: frozenset[str]) -> list[tuple[str, str]]:
    """Fill the row's sex/age/site from the subject's participants.tsv row; the values of its
    ``identifying`` columns (:func:`haven.sources.bids.identifying_columns`) are identifiers."""
    ids = []
    for column, value in person.items():
        field = PARTICIPANT_FIELDS.get(column.lower())
        if field and value:
            row[field] = value
        elif column in identifying and value:
            ids.append((f"participants.{column}", value))
    return ids
