"""Ingest: walk a source folder into a manifest; quarantine every file that cannot be used.

Writes three tables (the PHI zone, see docs/architecture.md; :class:`Tables` names them):

* the manifest - one row per accepted file: ``path,kind,patient_id,study_uid,series_uid,
  sop_uid,accession,modality,label,sex,age,site,rows,cols``;
* the identifiers - ``patient_id,tag,value``: every identifying value seen in the accepted
  files' headers (for DICOM recursively through sequences and private tags), for the audit;
* the quarantine list - ``path,reason`` for every file that was not accepted.

A file is accepted when a reader of :mod:`haven.sources` takes it (a DICOM file with pixel data
that decodes, a PNG/JPEG/TIFF/BMP image that PIL can verify and load) and it has a label (or the
project only de-identifies, ``until: audit``: then a file without one keeps an empty label).  A bad
file never stops the run: its reason (exception class and message, never a header value) goes to
the quarantine list.

The stage: :mod:`haven.ingest.stage` (the walk, one shard of it), :mod:`haven.ingest.labels`
(class folders or a label table), :mod:`haven.ingest.merge` (the shards' tables as one).
"""

from haven.ingest.merge import merge_ingest
from haven.ingest.stage import ingest
from haven.ingest.tables import IDENTIFIER_COLUMNS, MANIFEST_COLUMNS, QUARANTINE_COLUMNS, Tables

__all__ = ["IDENTIFIER_COLUMNS", "MANIFEST_COLUMNS", "QUARANTINE_COLUMNS", "Tables", "ingest", "merge_ingest"]
