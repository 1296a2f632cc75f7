"""One DICOM file de-identified: read (a plain file from its bytes, :mod:`haven.deid.rawdataset`,
into the data set ``pydicom.dcmread`` gives; any other by ``dcmread``), checked whole, pixels cleaned where they may carry text
(:mod:`haven.deid.redact`), the header cleaned (:mod:`haven.deid.header`) and stamped with the
pseudonym and the method codes; the caller writes it (:func:`haven.deid.writer.write_dicom`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from haven import keys
from haven.deid import dicomraw, redact
from haven.deid.errors import AnonymizeError
from haven.deid.header import Context, clean, phi_pattern, put
from haven.deid.options import method
from haven.deid.table import option_actions
from haven.deid.writer import METHOD_CODES, Meta, method_codes, method_items, safe_name

DICOM_SUFFIX = ".dcm"


def _transfer_syntax(ds) -> str:
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_complete(ds) -> None:
    """Raise when the file was cut short: pydicom reads a truncated file without complaint."""
    last = next(reversed(ds._dict.values()), None) if len(ds) else None
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if (getattr(last, "is_raw", False) and isinstance(value, bytes) and length is not None
            and length != 0xFFFFFFFF and len(value) < length):
        raise AnonymizeError("truncated DICOM (last element shorter than its length)")
    pixel = next((t for t in (0x7FE00010, 0x7FE00008, 0x7FE00009) if t in ds), None)
    try:
        sop_class = pydicom.uid.UID(dicomraw.text(ds, 0x00080016))
        is_image = "Image Storage" in sop_class.name
    except Exception:
        is_image = False
    if pixel is None:
        if "Rows" in ds or is_image:
            raise AnonymizeError("image attributes without pixel data (truncated?)")
        return
    if pixel != 0x7FE00010:
        return
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and pydicom.uid.UID(str(ts)).is_compressed:
        return  # encapsulated: fragment structure was checked by the reader (delimiters)
    try:
        rows, cols = int(dicomraw.number(ds, 0x00280010)), int(dicomraw.number(ds, 0x00280011))
        bits = int(dicomraw.number(ds, 0x00280100))
        samples = int(dicomraw.number(ds, 0x00280002) or 1)
        frames = int(float(dicomraw.text(ds, 0x00280008) or 1))
    except Exception:
        raise AnonymizeError("pixel data without a usable image pixel description") from None
    expected = (rows * cols * samples * frames * bits + 7) // 8
    if dicomraw.text(ds, 0x00280004).strip() in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        expected = expected * 2 // 3
    raw = ds.get_item(0x7FE00010)
    size = len(raw.value) if isinstance(getattr(raw, "value", None), (bytes, bytearray)) else None
    if size is not None and size < expected:
        raise AnonymizeError("pixel data shorter than the image size (truncated?)")



def _parsed(src: Path):
    """``dcmread(src, force=True)`` built from the byte-level parse (:mod:`haven.deid.rawdataset`) for
    a plain file; None for any other (and for one pydicom would warn about)."""
    from haven.deid.rawdataset import dataset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning while building: leave the file to pydicom
            return dataset(src.read_bytes(), str(src))
    except Exception:
        return None


def _read(src: Path):
    """The data set of ``src``, or AnonymizeError when it is not a whole DICOM image file."""
    ds, caught = _parsed(src), []
    if ds is None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(src, force=True)
        except Exception as e:
            raise AnonymizeError(f"DICOM read failed ({type(e).__name__})") from None
    if not isinstance(ds, Dataset) or len(ds) == 0:
        raise AnonymizeError("not a DICOM data set")
    if any("end of file" in str(w.message).lower() for w in caught):
        raise AnonymizeError("truncated DICOM (end of file inside an element)")
    _check_complete(ds)
    media_class = ""
    if getattr(ds, "file_meta", None) is not None:
        media_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if media_class == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
        raise AnonymizeError("DICOMDIR (media directory) is not an image")
    for kw, t in (("SOPInstanceUID", 0x00080018), ("SOPClassUID", 0x00080016)):
        try:
            ok = bool(dicomraw.text(ds, t).strip())
        except Exception:
            ok = False
        if not ok:
            raise AnonymizeError(f"missing {kw}")
    return ds


def deidentify_dicom(src: Path, row: dict, key: bytes, opts: dict, uid_cache: dict,
                     actions: dict[int, str] | None = None) -> tuple:
    """Read and de-identify one DICOM file; return (dataset, relative output path, actions, Meta).
    ``opts``: complete (:func:`haven.deid.options.options`)."""
    ds = _read(src)
    cleaned = redact.needs_cleaning(ds, opts["pixels"])
    blacked = 0
    if cleaned:
        try:
            blacked = redact.clean_pixels(ds, opts["pixels"])
        except redact.PixelCleanError as e:
            raise AnonymizeError(str(e)) from None
        except Exception as e:
            raise AnonymizeError(f"pixel cleaning failed ({type(e).__name__})") from None
    ts = _transfer_syntax(ds)

    patient_id = row.get("patient_id", "")
    pseudonym = keys.pseudonym(key, patient_id)
    shift = keys.day_shift(key, patient_id, int(opts["max_shift_days"]))
    if actions is None:
        actions = option_actions(opts)
    phi = None
    if opts["clean_descriptors"]:
        try:
            phi = phi_pattern(ds)
        except Exception as e:
            raise AnonymizeError(f"identifying values could not be collected ({type(e).__name__})") from None
    ctx = Context(key, pseudonym, shift, actions, uid_cache, bool(opts["retain_uids"]), phi,
                  opts["safe_private_table"])
    try:
        clean(ds, ctx)
    except AnonymizeError:
        raise
    except Exception as e:
        raise AnonymizeError(f"de-identification failed ({type(e).__name__})") from None

    values, codes = method(opts, cleaned)
    put(ds, 0x00100020, "LO", [pseudonym])  # PatientID
    put(ds, 0x00100010, "PN", [pseudonym])  # PatientName
    put(ds, 0x00120062, "CS", ["YES"])  # PatientIdentityRemoved
    put(ds, 0x00120063, "LO", values)  # DeidentificationMethod
    implicit, little = ds.original_encoding
    if little and implicit is not None:
        ds._dict[METHOD_CODES] = method_codes(tuple(codes), implicit)
    else:
        ds.DeidentificationMethodCodeSequence = method_items(codes)
    put(ds, 0x00280303, "CS",  # LongitudinalTemporalInformationModified
        ["MODIFIED" if opts["retain_longitudinal_modified_dates"] else "REMOVED"])

    sop = dicomraw.text(ds, 0x00080018)
    study = dicomraw.text(ds, 0x0020000D)
    if not study:
        study = keys.uid(key, "haven:no-study:" + patient_id)
    rel = f"{pseudonym}/{safe_name(study)}/{safe_name(sop)}{DICOM_SUFFIX}"
    return ds, rel, ctx.changed + blacked, Meta(dicomraw.text(ds, 0x00080016), sop, ts)
