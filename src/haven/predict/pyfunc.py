"""The registered model as an MLflow pyfunc that carries its preprocessing: input is what a user
has (DICOM, PNG or JPEG bytes in base64, or file paths), output is the :class:`Bundle`'s
prediction rows (probabilities, calibrated probabilities, the decided class, model, version,
input hash).

The package holds the train stage's ``model.pt`` (weights plus the training run's ``pixels``
settings and mean/std) and ``evaluation.json`` (:func:`evaluation_record` of evaluate's
metrics: temperature, decision rule, headline test metrics) as artifacts, and haven's own code
(``code_paths``), so ``mlflow models serve`` decodes a file exactly as ``haven predict`` does.

What arrives is only decoded to pixels, in memory: nothing from a request is logged or written
(an error names the row and the reason, never a value from the file).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import json
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from haven.predict.bundle import Bundle, evaluation_record

ARTIFACTS = {"model": "model.pt", "evaluation": "evaluation.json"}
#: request columns: ``data`` (base64 file bytes) or ``path`` (a file the server can read); an
#: optional ``filename`` only gives the reader a suffix hint (bytes without a DICOM preamble)
INPUT_COLUMNS = ("data", "path", "filename")
# what decoding and the network import (haven itself travels as code_paths)
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pydicom", "pylibjpeg",
                "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pyyaml", "cloudpickle")


def _bad(message: str) -> Exception:
    """An input error the scoring server answers with 400 (not a 500 with a traceback)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _row_bytes(row: dict, i: int) -> tuple[bytes, str]:
    """(file bytes, suffix hint) of one request row."""
    data, path = _text(row.get("data")), _text(row.get("path"))
    if data:
        try:
            return base64.b64decode(data, validate=True), _text(row.get("filename"))
        except (binascii.Error, ValueError):
            raise _bad(f"row {i}: column 'data' is not base64 (send the file's bytes base64-encoded)") from None
    if path:
        try:
            return Path(path).read_bytes(), path
        except OSError as e:
            raise _bad(f"row {i}: the file in column 'path' cannot be read ({type(e).__name__}); send its bytes "
                       "base64-encoded in column 'data' instead") from None
    raise _bad(f"row {i}: neither 'data' (base64 file bytes) nor 'path' given")


def samples_from_frame(bundle: Bundle, frame: pd.DataFrame) -> np.ndarray:
    """A request DataFrame → uint8 (N, C, S, S), each file decoded as the training samples were."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if not set(frame.columns) & {"data", "path"}:
        raise _bad("the input needs a column 'data' (base64 DICOM/PNG/JPEG bytes) or 'path' (file paths)")
    out = []
    for i, row in enumerate(frame.to_dict("records")):
        data, name = _row_bytes(row, i)
        try:
            sample, _ = bundle.sample_bytes(data, name)
        except Exception as e:  # noqa: BLE001 - any decoder's failure is a bad input, worded without its values
            reason = str(e) if isinstance(e, ValueError) and "not an image" in str(e) else type(e).__name__
            raise _bad(f"row {i}: the file cannot be decoded ({reason}); send a DICOM with pixel data, a PNG or "
                       "a JPEG (a NIfTI volume to a volume model)") from None
        out.append(sample)
    return np.stack(out) if out else np.zeros((0,), np.uint8)


class HavenModel(mlflow.pyfunc.PythonModel):
    """A haven model bundle behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.bundle = Bundle.load(context.artifacts["model"], context.artifacts["evaluation"],
                                  tta=config.get("tta"), name=config.get("name", ""),
                                  version=str(config.get("version", "")))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        samples = samples_from_frame(self.bundle, model_input)
        if not len(samples):
            return pd.DataFrame(columns=output_columns(self.bundle))
        return pd.DataFrame(self.bundle.predict(samples), columns=output_columns(self.bundle))


def output_columns(bundle: Bundle) -> list[str]:
    return bundle.task.prediction_columns(bundle.classes) + ["model", "model_version", "input_hash"]


def example_png(bundle: Bundle) -> bytes:
    """A small real PNG of the model's input size (a gray ramp; RGB for an RGB model): the input
    example the package is logged with."""
    import io

    from PIL import Image

    size = int(bundle.pixels["size"])
    ramp = np.add.outer(np.arange(size), np.arange(size)) * (255 // max(1, 2 * size - 2))
    image = Image.fromarray(ramp.astype(np.uint8))
    if bundle.pixels.get("mode") == "rgb":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _signature(bundle: Bundle, example: pd.DataFrame):
    """Input: the optional string columns of :data:`INPUT_COLUMNS` (a request sends ``data`` or
    ``path``); output: inferred from the bundle's prediction on the example."""
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema

    rows = bundle.predict(samples_from_frame(bundle, example))
    signature = infer_signature(example, pd.DataFrame(rows, columns=output_columns(bundle)))
    signature.inputs = Schema([ColSpec("string", c, required=False) for c in INPUT_COLUMNS])
    return signature


def requirements() -> list[str]:
    """The pip requirements of the package, pinned to the versions that logged it."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


# not packaged: the demo generators hold (fictional) names and ids a leak check rightly flags, and
# applying a model never needs them
# the demo generators (every demo*.py): their fictional names, ids and descriptions are what the
# pipeline's leak check looks for in the tracking store
LEFT_OUT = ("demo*.py", "__pycache__", "*.pyc")


def _code(tmp: str) -> str:
    """A copy of haven's code for ``code_paths``, less :data:`LEFT_OUT`."""
    import shutil

    import haven

    target = Path(tmp) / "code" / "haven"
    shutil.copytree(Path(haven.__file__).parent, target, ignore=shutil.ignore_patterns(*LEFT_OUT))
    return str(target)


def log_package(model_pt: str | Path, metrics_json: str | Path | None, *, name: str, version: str = "",
                tta: dict | None = None, params: dict | None = None):
    """Log the model package (``name="model"``) into the active MLflow run; returns its ModelInfo.
    ``name``/``version`` are what its rows say until :func:`load_bundle` reads them from the
    registry (the registry version does not exist yet when the package is logged)."""
    bundle = Bundle.load(model_pt, metrics_json, tta=tta, name=name, version=version)
    if bundle.dims == 3:  # a volume model's example: a NIfTI on its grid
        from haven.predict.volumes import example_volume

        example = pd.DataFrame({"data": [base64.b64encode(example_volume(bundle.meta)).decode("ascii")],
                                "filename": ["example.nii.gz"]})
    else:
        example = pd.DataFrame({"data": [base64.b64encode(example_png(bundle)).decode("ascii")]})
    with tempfile.TemporaryDirectory() as tmp:
        evaluation = Path(tmp) / ARTIFACTS["evaluation"]
        evaluation.write_text(json.dumps(bundle.evaluation, default=str))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=HavenModel(),
            artifacts={"model": str(Path(model_pt).resolve()), "evaluation": str(evaluation)},
            model_config={"name": name, "version": version, "tta": tta},
            code_paths=[_code(tmp)],
            signature=_signature(bundle, example), input_example=example, pip_requirements=requirements(),
            metadata={**_metadata(bundle), "request": "DataFrame: column 'data' (base64 DICOM/PNG/JPEG bytes) or "
                                                    "'path' (file paths); the training run's preprocessing inside"},
            params={k: str(v) for k, v in (params or {}).items()} or None)
    return info


def _metadata(bundle: Bundle) -> dict:
    """What the model is (classes, input spec, calibration, decision rule), JSON-safe for MLmodel."""
    return json.loads(json.dumps({k: v for k, v in bundle.describe().items() if k not in ("name", "version")},
                                 default=str))


def _registry_name_version(uri: str) -> tuple[str, str]:
    """``models:/name/3`` → (name, "3"); ``models:/name@alias`` → (name, the alias's version);
    anything else (``runs:/...``, a logged model id) → ("", "")."""
    from mlflow import MlflowClient

    if not uri.startswith("models:/"):
        return "", ""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
    name, _, version = rest.partition("/")
    if version.isdigit():
        return name, version
    return "", ""  # models:/<model id> of a logged (unregistered) model


def _download(uri: str, sub: str, dst: str) -> Path:
    """One part (``artifacts``, ``MLmodel``) of a model package; the whole package where the URI
    kind does not take a sub-path (``models:/<logged model id>``)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{sub}", dst_path=dst))
    except MlflowException:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)) / sub


def load_bundle(uri: str, tta: dict | None = None) -> Bundle:
    """The :class:`Bundle` of a logged or registered pyfunc package (its two artifacts downloaded
    from the tracking server, not its code), named after the registry entry the URI points at."""
    name, version = _registry_name_version(uri)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = _download(uri, "artifacts", tmp)
        model_pt, evaluation = artifacts / ARTIFACTS["model"], artifacts / ARTIFACTS["evaluation"]
        if not model_pt.is_file():
            raise ValueError(f"{uri} is not a haven model package (no artifacts/{ARTIFACTS['model']}): register "
                             "the project's model again with `haven register`")
        config = _model_config(_download(uri, "MLmodel", str(Path(tmp) / "meta")))
        return Bundle.load(model_pt, evaluation, tta=tta, name=name or config.get("name", ""),
                           version=version or str(config.get("version", "")))


def _model_config(mlmodel_file: Path) -> dict:
    """The ``model_config`` the package was logged with (its MLmodel file)."""
    import yaml

    mlmodel = yaml.safe_load(Path(mlmodel_file).read_text())
    return (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get("config") or {}


__all__ = ["HavenModel", "evaluation_record", "load_bundle", "log_package", "samples_from_frame"]
