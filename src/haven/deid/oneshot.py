"""De-identify one export in one call: ingest, anonymize and the audit, without Snakemake.

``haven deid SRC DST`` (:mod:`haven.cli.deidentify`) calls :func:`deidentify`.  The stage
functions are the pipeline's own (:func:`haven.ingest.ingest`, :func:`haven.deid.anonymize.anonymize`,
:func:`haven.deid.audit.gate`), so a file comes out exactly as the project DAG would write it.

Where things go:

* ``DST/data/...``, ``DST/manifest.csv``, ``DST/anonymization.log.csv``, ``DST/quarantine.csv``
  (input rows and reasons, never paths) and ``DST/audit.json`` (``audit.failed.json`` when the
  audit found something): the safe side, what may be handed on;
* the PHI zone - ingest's manifest, identifiers and quarantine list, which hold the original
  ids and file names the audit searches for - in a private folder (mode 0700) *outside* DST:
  ``work``, else ``DST/../.haven-<DST name>-phi``; keep it, like the key, away from the data.

Labels are optional (de-identification only): class folder names or nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from haven.config import validate
from haven.deid.anonymize import anonymize
from haven.deid.audit import gate
from haven.ingest import Tables, ingest


def anonymize_options(given: dict | None) -> dict:
    """The ``anonymize`` section ``given`` (a part of it) checked by the schema and completed with its
    defaults, exactly as a project's section in ``config.yaml`` would be."""
    config = validate({"projects": {"deid": {"source": ".", "anonymize": dict(given or {})}}}, "the options")
    return config["projects"]["deid"]["anonymize"]


def phi_folder(dst: Path, work: Path | None = None) -> Path:
    """The private folder for the PHI-zone tables: ``work``, else a hidden sibling of ``dst``."""
    return Path(work) if work is not None else Path(dst).parent / f".haven-{Path(dst).name}-phi"


def _check_places(src: Path, dst: Path, phi: Path) -> None:
    """SRC, DST and the PHI folder must not nest: outputs in the source would be read as inputs on
    the next run, and PHI inside DST would be handed on with the de-identified data."""
    if not src.is_dir():
        raise ValueError(f"source {src} is not a folder: give the export's folder as SRC")
    s, d, p = src.resolve(), dst.resolve(), phi.resolve()
    if d.is_relative_to(s) or s.is_relative_to(d):
        raise ValueError(f"DST {dst} and SRC {src} lie inside one another: choose a DST outside the export")
    if p.is_relative_to(d) or p.is_relative_to(s):
        raise ValueError(f"the PHI folder {phi} lies inside DST or SRC: give --work a private folder outside both")


def _private(folder: Path) -> Path:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # also when it existed: only the owner may read original identifiers
    return folder


def deidentify(src: Path, dst: Path, key: bytes, *, options: dict | None = None, work: Path | None = None,
               check_pixels: bool = True, label_folders: bool = True) -> dict:
    """Ingest ``src``, de-identify it into ``dst`` and audit the result (see the module docstring).
    ``label_folders=False``: unlabeled data (new patients to predict), no label taken from folder
    names, which in an export often name patients or studies.

    ``options``: the ``anonymize`` section (or a part of it; the schema gives the rest).
    Returns the summary, identifier-free: ``files``, ``deidentified``, ``quarantined`` (at ingest
    and at anonymize), ``audit_passed``, ``findings``, ``seconds``, ``files_per_second``, and where
    the outputs are (``data``, ``manifest``, ``audit``, ``phi``).
    """
    src, dst = Path(src), Path(dst)
    phi = phi_folder(dst, work)
    _check_places(src, dst, phi)
    opts = anonymize_options(options)
    started = time.monotonic()
    tables = Tables.in_folder(_private(phi))
    got = ingest(src, tables, check_pixels=check_pixels, labels_required=False, label_folders=label_folders)
    dst.mkdir(parents=True, exist_ok=True)
    out = {"data": dst / "data", "manifest": dst / "manifest.csv", "log": dst / "anonymization.log.csv",
           "quarantine": dst / "quarantine.csv"}
    done = anonymize(src, tables.manifest, key, data=out["data"], manifest=out["manifest"], log_csv=out["log"],
                     quarantine=out["quarantine"], options=opts)
    result, written = gate([out["data"]], out["manifest"], out["log"], tables.identifiers, tables.manifest,
                           dst / "audit.json", options=opts, key=key)
    seconds = time.monotonic() - started
    return {
        "files": got["files"], "deidentified": done["anonymized"],
        "quarantined": got["quarantined"] + done["quarantined"],
        "quarantined_at_ingest": got["quarantined"], "quarantined_at_anonymize": done["quarantined"],
        "audit_passed": bool(result["passed"]), "findings": len(result["findings"]),
        "seconds": round(seconds, 3), "files_per_second": round(got["files"] / seconds, 1) if seconds > 0 else 0.0,
        "data": str(out["data"]), "manifest": str(out["manifest"]), "audit": str(written), "phi": str(phi),
    }

