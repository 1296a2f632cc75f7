"""haven: a Snakemake-orchestrated deep-learning pipeline for image research.

One module per stage of the DAG: ``demo`` (demo data), ``ingest``, ``anonymize``,
``audit``, ``preprocess``, ``tune``, ``train``, ``evaluate``, ``report``;
``tracking`` wraps MLflow, ``keys`` holds the keyed pseudonym primitives and
``cli`` exposes every stage as a ``haven`` subcommand.
"""

__version__ = "0.1.0"
