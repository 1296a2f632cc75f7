"""Audit: prove that no original identifier survived anonymization (the safe-haven gate).

:func:`audit` re-reads everything the anonymize stage wrote - every file of its data folders
(:mod:`haven.deid.scan`: DICOM elements, image metadata, path components), every cell of its
manifest and log - and looks for the identifying values that ingest recorded plus the ingest
manifest's ids, UIDs, accession numbers and sites (:mod:`haven.deid.identifiers`).  A finding names
the file, the place and the kind of identifier, never the value itself.  :func:`gate` is the stage:
the audit under the project's anonymize settings, its result written where the rule says.

A finding a person responsible for the data has cleared as not PHI (the project's ``audit.accept``
list, :mod:`haven.deid.accept`: the keyed hash of the value and its place) is accepted: counted
in the result with the entries' places, reasons and who, never a value.  :func:`review` lists
the findings *with* their values and the line that accepts each, for ``haven audit --review``.

:func:`audit_tree` runs the same checks over any folder (e.g. the original data, to show that the
audit does find what it looks for).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from haven.config import section_defaults
from haven.deid import accept as accepting
from haven.deid.identifiers import Identifiers, load_identifiers, read_csv
from haven.deid.options import options as complete_options
from haven.deid.profile import CLEAN_DESCRIPTORS, safe_private_table
from haven.deid.scan import PixelText, scan_csv, scan_file, scan_tree
from haven.deid.volumes import check_defaced as check_volumes_defaced
from haven.io import atomic_write_text
from haven.progress import progress

log = logging.getLogger(__name__)


def gate(data: Sequence[Path], manifest: Path, log_csv: Path, identifiers: Path, ingest_manifest: Path,
         result: Path, options: dict | None = None, data_root: Path | None = None, accept: list | None = None,
         accept_key: bytes | None = None, key: bytes | None = None) -> tuple[dict, Path]:
    """The audit under the project's ``anonymize`` settings (``options``; what they leave out comes
    from the schema), written as JSON to ``result`` when it passed, else beside it as
    ``<name>.failed.json``: a failed audit never leaves the file the next stage waits for, and a
    stale result of the other outcome is removed.  ``accept``: the project's ``audit.accept``
    list, checked under ``accept_key`` (the project key).  ``key``, the key anonymize used, when
    at hand: with it a date that is the shifted image of another of the patient's dates is told
    from a leak (without it such a coincidence fails the audit).  Returns (result, the file written)."""
    out = audit(data, manifest, log_csv, identifiers, ingest_manifest, data_root=data_root, accept=accept,
                accept_key=accept_key, key=key, **_profile(options))
    result = Path(result)
    failed = result.with_name(f"{result.stem}.failed{result.suffix}")
    target, other = (result, failed) if out["passed"] else (failed, result)
    other.unlink(missing_ok=True)
    write_audit_result(out, target)
    return out, target


def _profile(options: dict | None) -> dict:
    """The audit's keyword arguments under the project's ``anonymize`` settings."""
    opts = complete_options(options)
    pixels = opts["pixels"]
    return dict(ocr_modalities=pixels["modalities"], ocr=pixels["clean"] != "off",
                clean_descriptors=bool(opts["clean_descriptors"]), retain_uids=bool(opts["retain_uids"]),
                safe_private=opts["safe_private"] or None, deface=opts["deface"] or None,
                max_shift_days=int(opts["max_shift_days"]))


def review(data: Sequence[Path], manifest: Path, log_csv: Path, identifiers: Path, ingest_manifest: Path,
           key: bytes, options: dict | None = None, data_root: Path | None = None,
           accept: list | None = None) -> dict:
    """What ``haven audit --review`` shows the reviewer: the audit of :func:`gate`, its findings
    not yet accepted as rows *with their values* and the config line accepting each
    (:func:`haven.deid.accept.review_rows`), and what the accept list already clears.  For the
    reviewer's terminal only: never written to a file or a log."""
    accepting.check_entries(accept, key)
    files, findings, _, _ = _scan_outputs(data, manifest, log_csv, identifiers, ingest_manifest,
                                          data_root=data_root, **_profile(options))
    remaining, record = accepting.apply(findings, accept, key)
    return {"files": files, "rows": accepting.review_rows(remaining, key), "accepted": record}


def audit(data: Sequence[Path], manifest: Path, log_csv: Path, identifiers: Path, ingest_manifest: Path, *,
          data_root: Path | None = None, key: bytes | None = None, max_shift_days: int | None = None,
          ocr_modalities: Iterable[str] | None = None, ocr: bool = True, clean_descriptors: bool = False,
          retain_uids: bool = False, safe_private: list[dict] | None = None, deface: dict | None = None,
          accept: list | None = None, accept_key: bytes | None = None) -> dict:
    """Audit the anonymize stage's outputs - the files in the folders ``data``, its ``manifest`` and
    ``log_csv`` - against the ``identifiers`` and ``ingest_manifest`` that ingest wrote.

    Files are named by their path relative to ``data_root``, the folder the manifest's paths are
    relative to (default: the one folder of ``data``).  Returns ``{"passed", "files", "findings":
    [{"file", "where", "kind"}], ...}``; a finding never carries the matched value.  ``key`` is
    optional: with it, a date that equals one of the patient's original dates *and* is the shifted
    image of another of them (a coincidence of the day shift, up to ``max_shift_days``, default
    the schema's) is not reported.  Files that may carry burned-in text (BurnedInAnnotation YES or
    one of ``ocr_modalities``, default the schema's ``anonymize.pixels.modalities``) have their
    pixels read by OCR and the text matched too (``ocr=False`` or no OCR engine: counted in
    ``pixel_text_not_read``).  ``clean_descriptors``/``retain_uids``: the anonymize options of
    that name were on (the descriptions' whole values and the UIDs are then not searched);
    ``safe_private``: the Retain Safe Private allow-list (``anonymize.safe_private``).
    ``deface``: the project's ``anonymize.deface`` settings; when enabled, every file of a head
    volume it covers must say it was defaced (RecognizableVisualFeatures NO and code 113102).
    ``accept``: the project's ``audit.accept`` list (:mod:`haven.deid.accept`), its hashes checked
    under ``accept_key``; the findings it clears are counted under ``accepted`` (with the
    entries' places, reasons and who) and do not fail the audit.
    """
    accepting.check_entries(accept, accept_key)  # a malformed entry fails before the scan, not after it
    files, findings, ids, pixels = _scan_outputs(
        data, manifest, log_csv, identifiers, ingest_manifest, data_root=data_root, key=key,
        max_shift_days=max_shift_days, ocr_modalities=ocr_modalities, ocr=ocr,
        clean_descriptors=clean_descriptors, retain_uids=retain_uids, safe_private=safe_private, deface=deface)
    remaining, record = accepting.apply(findings, accept, accept_key)
    return _result(files, remaining, ids, pixels, accepted=record)


def _scan_outputs(data: Sequence[Path], manifest: Path, log_csv: Path, identifiers: Path, ingest_manifest: Path,
                  *, data_root: Path | None = None, key: bytes | None = None, max_shift_days: int | None = None,
                  ocr_modalities: Iterable[str] | None = None, ocr: bool = True, clean_descriptors: bool = False,
                  retain_uids: bool = False, safe_private: list[dict] | None = None,
                  deface: dict | None = None) -> tuple[int, list[dict], Identifiers, PixelText]:
    """(files, findings with their ``values``, identifiers, pixel reader) of :func:`audit`'s scan."""
    data = [Path(d) for d in data]
    manifest, log_csv, identifiers = Path(manifest), Path(log_csv), Path(identifiers)
    if data_root is None and len(data) != 1:
        raise ValueError("audit: several data folders need data_root (the folder the manifest's paths start in)")
    root = Path(data_root) if data_root is not None else data[0]
    if not identifiers.is_file():
        raise FileNotFoundError(f"{identifiers} not found: the audit needs the identifiers recorded by "
                                f"`haven ingest`")
    ids = _identifiers(load_identifiers(identifiers, ingest_manifest), key, max_shift_days, clean_descriptors,
                       retain_uids, safe_private)
    patient_of = _patients(Path(ingest_manifest), log_csv, root)
    pixels = PixelText(ocr_modalities, ocr)
    files, findings = 0, []
    # the outputs the log lists are what the walk should find (a stale or stray file makes it more)
    with progress("audit", len(patient_of) or None, log=log) as p:
        for folder in sorted(data, key=lambda d: d.as_posix()):  # the order a walk of the data root takes
            if folder.is_dir():
                n, found = scan_tree(folder, ids, patient_of, pixels, base=root, progress=p)
                files += n
                findings.extend(found)
    for path in (*data, manifest, log_csv):
        if not path.exists():  # fail closed: an incomplete output is not clean
            findings.append({"file": path.name, "where": path.name, "kind": "missing"})
    for path in (manifest, log_csv):
        findings.extend(scan_csv(path, ids))
    if deface and deface.get("enabled") and manifest.is_file():
        findings.extend(_check_defaced(root, read_csv(manifest), deface))
    if manifest.is_file():  # NIfTI head volumes are defaced by default (anonymize.deface.volumes)
        findings.extend(check_volumes_defaced(root, read_csv(manifest), deface or {}))
    return files, findings, ids, pixels


def _identifiers(entries: list[tuple[str, str, str]], key: bytes | None, max_shift_days: int | None,
                 clean_descriptors: bool, retain_uids: bool, safe_private: list[dict] | None) -> Identifiers:
    """The identifiers compiled under the profile options that keep some values on purpose."""
    shifts = None
    if key is not None:
        from haven import keys

        if max_shift_days is None:
            max_shift_days = section_defaults("anonymize")["max_shift_days"]
        shifts = {p: keys.day_shift(key, p, max_shift_days) for p in {e[0] for e in entries if e[0]}}
    retained = CLEAN_DESCRIPTORS if clean_descriptors else ()
    safe = ()
    if safe_private:
        safe = {(g, o) for (g, _), offsets in safe_private_table(safe_private).items() for o in offsets}
    return Identifiers(entries, shifts, retained, retain_uids, safe)


def _patients(ingest_manifest: Path, log_csv: Path, root: Path | None = None) -> dict[str, str]:
    """Every output file -> the patient of its input (for the per-patient date check), a volume's
    JSON sidecar (under ``root``) with it."""
    patient_of: dict[str, str] = {}
    if ingest_manifest.is_file() and log_csv.is_file():
        inputs = read_csv(ingest_manifest)
        for row in read_csv(log_csv):
            try:
                index = int(row.get("input_index", ""))
            except ValueError:
                continue
            if row.get("output") and 0 <= index < len(inputs):
                out = row["output"]
                patient_of[out] = inputs[index].get("patient_id", "")
                side = out[: -len(".nii.gz")] + ".json" if out.endswith(".nii.gz") else ""
                if side and root is not None and (root / side).is_file():
                    patient_of[side] = patient_of[out]
    return patient_of


def _check_defaced(data: Path, manifest: list[dict], deface_options: dict) -> list[dict]:
    """A finding for every file of a head volume the project defaces that does not say so."""
    import pydicom

    from haven.deid import deface

    opts = deface.options(deface_options)
    findings = []
    for files in deface.candidates(manifest, opts).values():
        headers = {}
        for f in files:
            try:
                headers[f] = pydicom.dcmread(data / f, stop_before_pixels=True)
            except Exception as e:
                findings.append({"file": f, "where": "file", "kind": f"unreadable ({type(e).__name__})"})
        if deface.slices(headers.values()) < int(opts["min_slices"]):
            continue
        for f, ds in headers.items():
            if not deface.applies(ds, opts):
                continue
            codes = {str(i.get("CodeValue", "")) for i in ds.get("DeidentificationMethodCodeSequence", [])}
            if str(ds.get("RecognizableVisualFeatures", "")).upper() != "NO" or deface.CODE[0] not in codes:
                findings.append({"file": f, "where": "(0028,0302) RecognizableVisualFeatures",
                                 "kind": "head volume not defaced"})
    return findings


def audit_tree(root: Path, identifiers: set[str] | Iterable[str] | Path | str, ocr: bool = True) -> dict:
    """Audit every file under ``root`` against ``identifiers``: an ``identifiers.csv`` path (its
    folder's ``manifest.csv`` is used too when present) or a set of values (kind ``identifier``)."""
    root = Path(root)
    if isinstance(identifiers, (str, Path)):
        path = Path(identifiers)
        if path.is_dir():
            entries = load_identifiers(path / "identifiers.csv", path / "manifest.csv")
        elif path.name == "identifiers.csv" and (path.parent / "manifest.csv").is_file():
            entries = load_identifiers(path, path.parent / "manifest.csv")
        else:
            entries = [(r.get("patient_id", ""), r.get("tag", ""), r.get("value", ""))
                       for r in read_csv(path)]
    else:
        entries = [("", "identifier", v) for v in identifiers]
    ids = Identifiers(entries)
    pixels = PixelText(None, ocr)
    files, findings = scan_tree(root, ids, None, pixels) if root.is_dir() else (0, [])
    if root.is_file():
        files, findings = 1, scan_file(root, root.name, ids, None, pixels)
    return _result(files, findings, ids, pixels)


def write_audit_result(result: dict, out_json: Path) -> Path:
    """Write the audit result as JSON, atomically (no partial file after a kill)."""
    return atomic_write_text(Path(out_json), json.dumps(result, indent=2, sort_keys=True) + "\n")


def _result(files: int, findings: list[dict], ids: Identifiers, pixels: PixelText | None = None,
            accepted: dict | None = None) -> dict:
    # the values a finding was made from stay here: the result names places, never values
    findings = [{k: f[k] for k in ("file", "where", "kind")} for f in findings]
    out = {"passed": not findings, "files": files, "findings": findings,
           "identifiers": ids.count, "identifiers_not_searched": ids.skipped}
    if accepted is not None:
        out["accepted"] = accepted
    if pixels is not None:
        out["pixel_text_read"] = pixels.read
        out["pixel_text_not_read"] = pixels.not_read
    return out
