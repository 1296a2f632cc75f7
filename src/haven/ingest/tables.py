"""The ingest stage's three tables (its contract with anonymize and the audit, docs/architecture.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

MANIFEST_COLUMNS = ["path", "kind", "patient_id", "study_uid", "series_uid", "sop_uid", "accession",
                    "modality", "label", "sex", "age", "site", "rows", "cols", "role", "mask",
                    "session", "suffix", "shape", "spacing", "orientation"]
# role: "image" (a sample) or "mask" (a DICOM-SEG; old manifests: empty = image); mask: the file
# of an image's mask relative to the source (a segmentation project's PNG/TIFF/NIfTI masks), else "";
# session..orientation: a NIfTI volume's BIDS session and suffix, shape, spacing (mm), axis codes
IDENTIFIER_COLUMNS = ["patient_id", "tag", "value"]
QUARANTINE_COLUMNS = ["path", "reason"]


@dataclasses.dataclass(frozen=True)
class Tables:
    """Where one ingest (or one shard of it) writes its manifest, identifiers and quarantine list.
    The rules name all three files; :meth:`in_folder` is the layout for runs by hand and tests."""

    manifest: Path
    identifiers: Path
    quarantine: Path

    @classmethod
    def in_folder(cls, folder: str | Path) -> "Tables":
        folder = Path(folder)
        return cls(folder / "manifest.csv", folder / "identifiers.csv", folder / "quarantine.csv")

    @classmethod
    def of(cls, out: "str | Path | Tables") -> "Tables":
        """``out`` as Tables: given, or the standard names in the folder ``out``."""
        return out if isinstance(out, Tables) else cls.in_folder(out)
