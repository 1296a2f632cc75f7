"""The model bundle: what a trained model needs to be applied to a new file exactly as it was
trained and evaluated, in one object (MONAI bundles and nnU-Net's plans are the models).

* ``model.pt`` (:func:`haven.learn.checkpoint.save_model`): weights, task, classes, and the
  training run's preprocessing - ``pixels`` (size, mode, HU windows, slab) and the train split's
  mean/std; nothing is recomputed on new data;
* evaluate's ``metrics.json`` (or its ``decision`` part, :func:`evaluation_record`): the
  temperature fitted on validation and the decision rule chosen there
  (:mod:`haven.trust.decision`);
* the project's ``tta`` setting when predictions should average views (:mod:`haven.learn.tta`).

A sample goes file (a path or bytes) → :meth:`Bundle.sample` (the preprocess stage's own
:func:`haven.learn.preprocess.load_sample`, uint8 (C, S, S)) → :meth:`Bundle.predict` (normalize,
network, task scores, TTA, temperature, decision) → one row per sample.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# the keys of metrics.json a bundle carries (what prediction applies, plus what the card shows)
EVALUATION_KEYS = ("decision", "classes", "n", "accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "qwk",
                   "macro_roc_auc", "micro_roc_auc", "weighted_log_loss")


class BundleError(ValueError):
    """A model file that cannot be applied (too old, or not a haven model); the message says why."""


def evaluation_record(metrics: dict) -> dict:
    """The part of evaluate's ``metrics.json`` a bundle carries: the temperature, the decision
    rule and the headline test metrics."""
    out = {k: metrics[k] for k in EVALUATION_KEYS if k in metrics}
    out["temperature"] = (metrics.get("calibration") or {}).get("temperature")
    return out


def input_hash(sample: np.ndarray) -> str:
    """A short hash of the exact array the network saw (so a prediction by the DAG, the pyfunc
    and the REST service can be shown to have had the same input)."""
    return hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest()[:16]


@dataclass
class Bundle:
    model: object  # torch.nn.Module, in eval mode on the CPU
    meta: dict  # model.pt's record
    evaluation: dict = field(default_factory=dict)  # :func:`evaluation_record`
    tta: dict | None = None  # the project's ``tta`` setting (None: off)
    name: str = ""  # registered model name, or "" for a model file
    version: str = ""  # registry version, or the train run

    @classmethod
    def load(cls, model_path: str | Path, metrics_path: str | Path | None = None, *, tta: dict | None = None,
             name: str = "", version: str = "") -> "Bundle":
        """A bundle from the train stage's ``model.pt`` and (optional) evaluate's ``metrics.json``
        or a saved :func:`evaluation_record`."""
        from haven.learn.checkpoint import load_model

        model, meta = load_model(model_path)
        if not meta.get("pixels"):
            raise BundleError(f"{model_path} does not record its preprocessing (written before prediction "
                              "existed): re-run the train stage to write a model that can be applied")
        model.requires_grad_(False)
        evaluation = {}
        if metrics_path is not None and Path(metrics_path).is_file():
            record = json.loads(Path(metrics_path).read_text())
            evaluation = evaluation_record(record) if "calibration" in record else record
        return cls(model, meta, evaluation, tta, name or Path(model_path).parent.parent.name, version)

    # -- what it is ----------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.meta["classes"]]

    @property
    def pixels(self) -> dict:
        """The training run's preprocessing (size, mode, windows, slab)."""
        return dict(self.meta["pixels"])

    @property
    def dims(self) -> int:
        """3 for a volume model (model.pt ``dims: 3``: :mod:`haven.predict.volumes`), else 2."""
        return 3 if self.meta.get("dims") == 3 else 2

    @property
    def task(self):
        from haven.learn.tasks import get_task

        return get_task(self.meta["task"], self.meta.get("task_options"))

    @property
    def decision(self) -> dict | None:
        return self.evaluation.get("decision")

    @property
    def temperature(self) -> float | None:
        return self.evaluation.get("temperature")

    # -- file → sample ---------------------------------------------------------------------------
    def sample(self, source, kind: str) -> np.ndarray:
        """One file (a path, an open binary file, or for 2.5D the list of a slab's files) →
        uint8 (C, S, S), decoded as the training samples were.  A single file where the model
        wants a slab stands for all of its slices (the edge rule of a one-slice series)."""
        from haven.learn.preprocess import load_sample
        from haven.predict import volumes

        if self.dims == 3:  # a volume fitted as the training volumes were (its grid info: volumes.fit)
            return volumes.fit(self.meta, source, kind)[0]
        if kind in volumes.VOLUME_KINDS:
            raise ValueError(volumes.not_a_volume_model(Path(source).name if isinstance(source, (str, Path))
                                                        else "the file"))
        slab = int(self.pixels.get("slab") or 0)
        if slab and not isinstance(source, (list, tuple)):
            data = source.read() if hasattr(source, "read") else None
            source = [io.BytesIO(data) if data is not None else source for _ in range(2 * slab + 1)]
        return load_sample(source, kind, self.pixels)

    def sample_bytes(self, data: bytes, filename: str = "") -> tuple[np.ndarray, str]:
        """Bytes of a file (DICOM, PNG, JPEG, ...) → (sample, kind), decoded in memory; ValueError
        with the reason when no reader takes them."""
        from haven.sources import file_suffix, kind_of

        kind = kind_of(data[:132], file_suffix(filename) if filename else "")
        if kind is None and self.dims == 3 and (data[:2] == b"\x1f\x8b" or data[:4] == (348).to_bytes(4, "little")):
            kind = "nifti"  # a volume model's request: NIfTI bytes without a name (gzip or a NIfTI-1 header)
        if kind is None:
            raise ValueError("not an image haven reads (DICOM, PNG, JPEG, TIFF, BMP)")
        return self.sample(io.BytesIO(data), kind), kind

    # -- samples → predictions -------------------------------------------------------------------
    def scores(self, samples: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, C, S, S) → the task's scores (probabilities), with TTA when the bundle has it;
        volumes (N, C, D, H, W) of a 3D model through :func:`haven.predict.volumes.scores`."""
        import torch

        from haven.learn import tta
        from haven.learn.data import normalize
        from haven.predict import volumes

        if self.dims == 3:
            return volumes.scores(self, samples, batch_size)

        mean = torch.tensor(self.meta["mean"], dtype=torch.float32)
        std = torch.tensor(self.meta["std"], dtype=torch.float32)
        task, out = self.task, []
        with torch.inference_mode():
            for i in range(0, len(samples), batch_size):
                x = normalize(torch.from_numpy(np.ascontiguousarray(samples[i:i + batch_size])), mean, std)
                out.append(tta.scores(self.model, x, task, self.tta).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, samples: np.ndarray, batch_size: int = 64) -> list[dict]:
        """One row per sample: the task's columns (:meth:`haven.learn.tasks.base.Task.rows`:
        ``p_<class>``, ``pcal_<class>`` temperature-scaled, ``predicted`` under the decision rule
        chosen on validation), the model's name and version and the input's hash."""
        return self.outputs(samples, batch_size)[0]

    def outputs(self, samples: np.ndarray, batch_size: int = 64) -> tuple[list[dict], np.ndarray | None]:
        """:meth:`predict`'s rows and, for a task that predicts masks (segmentation), the masks
        (N, S, S) uint8 at the model's input size; None otherwise."""
        probs = self.scores(samples, batch_size)
        rows = self.task.rows(probs, self.evaluation, self.classes)
        masks = self.task.masks(probs) if self.task.targets == "masks" else None
        return ([{**row, "model": self.name, "model_version": self.version, "input_hash": input_hash(s)}
                 for row, s in zip(rows, samples)], masks)

    def describe(self) -> dict:
        """What the model is, for ``GET /model``, the pyfunc's metadata and the report."""
        return {"name": self.name, "version": self.version, "task": self.meta["task"], "classes": self.classes,
                "backbone": self.meta["backbone"], "input": {**self.pixels, "channels": int(self.meta["in_chans"]),
                                                             "mean": self.meta["mean"], "std": self.meta["std"]},
                "temperature": self.temperature, "decision": self.decision, "tta": self.tta,
                "test_metrics": {k: self.evaluation.get(k) for k in ("n", "accuracy", "balanced_accuracy", "roc_auc",
                                                                      "qwk", "macro_roc_auc") if k in self.evaluation}}
