"""The predictions as DICOM: one Structured Report per original study, in the PHI zone.

Why a Comprehensive SR holding a TID 1500 *Imaging Measurement Report* (highdicom's
:class:`~highdicom.sr.MeasurementReport` inside :class:`~highdicom.sr.ComprehensiveSR`): it is the
template PACS viewers and the DICOM-SR-to-FHIR mapping understand for an algorithm's result, and
highdicom builds and parses it whole (no hand-made content tree).  No image coordinates are stated,
so the 3D variant (Comprehensive3DSR) would add nothing.  Per predicted instance, one TID 1501
measurement group carries:

* the predicted class as the group's *Finding* (a code of haven's local scheme ``99HAVEN``: a
  project's classes are its own words, no standard code names them);
* its calibrated probability as a NUM *Probability* (DCM 122157, unit UCUM ``1``), the
  temperature-scaled value when evaluate calibrated the model;
* the model's name and version (TID 4019 Algorithm Identification), and the *original* instance as
  the group's source image.

The report's patient, study (StudyInstanceUID, AccessionNumber, ...) and evidence come from the
original files' headers (read without pixels), so a PACS files it with the patient's own study.
Its UIDs are derived from the original study and the model (the same run writes the same UIDs).
Where the source was a DICOMweb PACS the reports can be stored back (STOW-RS, :func:`store`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

import pydicom

from haven.io import read_rows, write_rows

log = logging.getLogger(__name__)

SCHEME = "99HAVEN"  # local coding scheme (PS3.16 8.2: 99 prefix) for a project's class names
INDEX_COLUMNS = ["study_uid", "sr_file", "sr_sop_uid", "instances"]


def derived_uid(namespace: str, *parts: str) -> str:
    """A 2.25 UID that only these parts decide (a re-run writes the same report UIDs): a 128-bit
    hash as the decimal suffix, as PS3.5 B.2 derives 2.25 UIDs from UUIDs.  Not pydicom's
    ``generate_uid(prefix=None, entropy_srcs=...)``: with no prefix it ignores the entropy and is random."""
    digest = hashlib.sha256("\x1f".join([namespace, *parts]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _uid(*parts: str) -> str:
    return derived_uid("haven-sr", *parts)


def finding_code(name: str):
    """A project's class as a coded concept (CodeValue is at most 16 characters: longer names hashed)."""
    from highdicom.sr import CodedConcept

    value = name if len(name) <= 16 and name.isascii() else hashlib.sha256(name.encode()).hexdigest()[:16]
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=name[:64])


def probability(row: dict) -> float:
    """The predicted class's calibrated probability (the raw one when evaluate had no temperature)."""
    cls = row["predicted"]
    value = row.get(f"pcal_{cls}") or row.get(f"p_{cls}")
    if value in (None, ""):
        raise ValueError(f"the predictions have no pcal_{cls}/p_{cls} column for the predicted class {cls!r}")
    return float(value)


def findings(row: dict, every_class: bool = False) -> list[tuple[str, float]]:
    """(finding, probability) per measurement group of one instance: the predicted class (single
    label, ordinal grade); with ``every_class`` (a multi-label model: :attr:`Task.reports_every_class`)
    every finding with its own probability, so the report states the negatives too."""
    if not every_class:
        return [(row["predicted"], probability(row))]
    names = [k[len("p_"):] for k in row if k.startswith("p_")]
    if not names:
        raise ValueError("the predictions have no probability column (p_<finding>)")
    return [(n, float(row.get(f"pcal_{n}") or row[f"p_{n}"])) for n in names]


def _groups(row: dict, header, algorithm, every_class: bool) -> list:
    from highdicom.sr import (Measurement, MeasurementsAndQualitativeEvaluations,
                              SourceImageForMeasurementGroup, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    return [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=_uid("group", row["sop_uid"], row["model"], *(
            [name] if i else [])), identifier=f"haven prediction {row['model']}"),
        finding_type=finding_code(name),
        algorithm_id=algorithm,
        measurements=[Measurement(name=codes.DCM.Probability, value=p, unit=codes.UCUM.NoUnits)],
        source_images=[SourceImageForMeasurementGroup(str(header.SOPClassUID), str(header.SOPInstanceUID))],
    ) for i, (name, p) in enumerate(findings(row, every_class))]


def report(rows: list[dict], headers: list, *, manufacturer: str = "haven", every_class: bool = False):
    """The Comprehensive SR of one study: ``rows`` (re-identified predictions, one per instance) and
    the original ``headers`` of those instances, in the same order (``every_class``: see :func:`findings`)."""
    from highdicom.sr import (AlgorithmIdentification, ComprehensiveSR, DeviceObserverIdentifyingAttributes,
                              MeasurementReport, ObservationContext, ObserverContext)
    from pydicom.sr.codedict import codes

    model, version = rows[0]["model"], rows[0].get("model_version") or "unversioned"
    study = str(headers[0].StudyInstanceUID)
    algorithm = AlgorithmIdentification(name=model, version=version)
    device = ObserverContext(observer_type=codes.cid270.Device, observer_identifying_attributes=(
        DeviceObserverIdentifyingAttributes(uid=_uid("device", model, version), name=model[:64])))
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[g for r, h in zip(rows, headers) for g in _groups(r, h, algorithm, every_class)])
    return ComprehensiveSR(
        evidence=headers, content=content[0],
        series_instance_uid=_uid("series", study, model, version), series_number=9001,
        sop_instance_uid=_uid("sop", study, model, version), instance_number=1,
        manufacturer=manufacturer, is_complete=True, series_description=f"haven {model} {version}"[:64])


def _studies(reidentified: Path) -> tuple[dict[str, list[dict]], int]:
    """The predicted DICOM rows per original study, and how many DICOM rows had no prediction."""
    studies: dict[str, list[dict]] = defaultdict(list)
    skipped = 0
    for row in read_rows(reidentified):
        if (row.get("kind") or "").strip().lower() != "dicom":
            continue
        if row.get("status") != "ok" or not row.get("predicted"):
            skipped += 1
            continue
        studies[row["study_uid"]].append(row)
    return studies, skipped


def _header(source: Path, row: dict, reidentified: Path):
    path = source / row["path"]
    if not path.is_file():
        # the message names the table and the fix, not the path (it may carry a name)
        raise FileNotFoundError(f"an original file of {reidentified} is missing under {source}: the SRs need the "
                                f"source folder the dataset was ingested from, unchanged")
    return pydicom.dcmread(path, stop_before_pixels=True)


def write_reports(reidentified: Path, source: Path, out: Path, every_class: bool = False) -> dict:
    """One SR file per original study of the DICOM rows of ``reidentified`` (the PHI-zone table of
    :mod:`haven.predict.reidentify`) into the folder ``out`` (mode 0700, files 0600), and
    ``out/index.csv`` (study → report); ``every_class``: see :func:`findings`.  Returns counts (no
    identifier)."""
    from haven.io import atomic_open

    reidentified, source, out = Path(reidentified), Path(source), Path(out)
    if not reidentified.is_file():
        raise FileNotFoundError(f"{reidentified} not found: run `haven reidentify` first")
    # highdicom logs, at INFO, the original SOP Instance UID it copies the study from: the rule's log
    # lies outside the PHI zone, so only its warnings (which name no instance) are let through
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    studies, skipped = _studies(reidentified)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    index, instances = [], 0
    for study, rows in sorted(studies.items()):
        sr = report(rows, [_header(source, r, reidentified) for r in rows], every_class=every_class)
        name = f"{sr.SOPInstanceUID}.dcm"
        with atomic_open(out / name, "wb") as fh:  # mkstemp: 0600 from the start
            sr.save_as(fh, enforce_file_format=True)
        index.append({"study_uid": study, "sr_file": name, "sr_sop_uid": sr.SOPInstanceUID, "instances": len(rows)})
        instances += len(rows)
    write_rows(out / "index.csv", INDEX_COLUMNS, index)
    os.chmod(out / "index.csv", 0o600)
    counts = {"reports": len(index), "instances": instances, "not_predicted": skipped}
    log.info("report-sr: %(reports)d SR(s) for %(instances)d predicted instance(s); %(not_predicted)d DICOM "
             "row(s) without a prediction", counts)
    return counts


def store(folder: Path, source: str, pacs: dict) -> int:
    """STOW-RS the SRs of ``folder`` (:func:`write_reports`) to the dicomweb:// ``source`` with the
    client and login of :func:`haven.fetch.client`; returns how many were stored."""
    from haven import fetch

    web, _ = fetch.client(source, pacs)
    names = [r["sr_file"] for r in read_rows(Path(folder) / "index.csv")]
    with fetch.remote(web, pacs):
        for name in names:
            web.store_instances([pydicom.dcmread(Path(folder) / name)])
    return len(names)
