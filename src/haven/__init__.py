"""haven: a Snakemake-orchestrated deep-learning pipeline for image research.

The package follows the DAG (docs/architecture.md is the map):

* ``sources`` - one reader per data kind (DICOM, images) behind one interface;
* ``ingest`` - a source folder into a manifest, identifiers and quarantine list (the PHI zone);
* ``deid`` - the de-identification subsystem: the PS3.15 profile as data, the DICOM anonymizer,
  pixel text, defacing, image metadata, and the audit that gates everything downstream;
* ``learn`` - preprocess (Zarr), models, the training loop, tune, and one ``Task`` per task;
* ``trust`` - evaluate: metrics with CIs, calibration, subgroups, explanations, robustness;
* ``report`` - the per-project page and model card (templates);
* ``track`` (MLflow), ``config`` (the schema and the one settings builder), ``cli`` (one
  ``haven`` subcommand per stage), and the small shared helpers ``io``, ``keys``, ``cluster``,
  ``shards`` (hashing only) and ``demo``.
"""

__version__ = "0.1.0"

import logging as _logging

# highdicom's INFO lines name the SOP Instance UIDs it copies attributes from: an original UID in
# a log outside the PHI zone (the pipeline test's leak scan found one in the demo's log)
_logging.getLogger("highdicom").setLevel(_logging.WARNING)
# bidsschematools says at INFO, on every first use, which schema file it loaded: noise in each job's log
_logging.getLogger("bidsschematools").setLevel(_logging.WARNING)
