"""Applying a trained model to new data: the model bundle (weights + the training run's
preprocessing + evaluate's calibration and decision rule), the predict stage of the DAG, and
the ways out of it (a predictions table, a re-identified copy in the PHI zone, DICOM SR, an
MLflow pyfunc, ONNX, the REST service).  Everything here reads a bundle; nothing retrains or
recomputes a statistic on new data."""
