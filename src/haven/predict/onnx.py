"""The network as ONNX, for deployment without torch, and its parity with torch on the test split.

Exported with torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which uses
onnxscript) at opset :data:`OPSET`, weights inside the one file, the batch axis dynamic.  The graph
is the network only: input ``images`` = normalized float32 (N, C, S, S) (uint8 / 255, then the
train split's mean/std, as :func:`haven.learn.data.normalize`), output ``logits``; ``onnx.json``
records the classes, the normalization and the preprocessing a caller must reproduce.

Parity: the test split through torch and through onnxruntime (CPU), the task's scores (softmax
probabilities for classification) compared; ``passed`` when the max abs difference is at most
:data:`TOLERANCE`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

OPSET = 18
TOLERANCE = 1e-4
EXPORTER = f"torch.onnx.export(dynamo=True), torch {torch.__version__.split('+')[0]}"


class ParityError(RuntimeError):
    """The ONNX graph's probabilities differ from torch's by more than the tolerance."""


def export(model_pt: str | Path, onnx_path: str | Path, opset: int = OPSET) -> dict:
    """``model.pt`` → ``onnx_path`` (one self-contained file); returns what the graph expects."""
    from haven.io import atomic_write_bytes
    from haven.learn.checkpoint import load_model

    model, meta = load_model(model_pt)
    example = torch.zeros(2, int(meta["in_chans"]), *spatial(meta))
    with warnings.catch_warnings():  # the exporter's notes about its own internals, not about this model
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, external_data=False,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    atomic_write_bytes(onnx_path, program.model_proto.SerializeToString())
    axes = "S, S" if len(spatial(meta)) == 2 else "D, H, W"
    return {"opset": opset, "exporter": EXPORTER, "input": f"images: float32 (N, C, {axes}), uint8/255 normalized "
            "with mean/std", "output": "logits (the task's scores: softmax for classification)",
            "classes": [str(c) for c in meta["classes"]], "mean": meta["mean"], "std": meta["std"],
            "size": meta["size"] if isinstance(meta["size"], list) else int(meta["size"]),
            "channels": int(meta["in_chans"]), "task": meta["task"], "pixels": meta.get("pixels")}


def spatial(meta: dict) -> list[int]:
    """The model's input grid: (S, S) for a 2D model, (D, H, W) for a volume model (meta["size"] a list)."""
    size = meta["size"]
    return [int(v) for v in size] if isinstance(size, (list, tuple)) else [int(size)] * 2


def parity(model_pt: str | Path, onnx_path: str | Path, test_zarr: str | Path, batch_size: int = 64
           ) -> tuple[float, int]:
    """(max abs difference of the task's scores between torch and onnxruntime over the test split,
    number of samples), the split normalized as :func:`haven.learn.infer.predict` does."""
    import onnxruntime as ort

    from haven.learn.checkpoint import load_model
    from haven.learn.data import ZarrSplit, normalize
    from haven.learn.tasks import get_task

    model, meta = load_model(model_pt)
    task = get_task(meta["task"], meta.get("task_options"))
    split = ZarrSplit(test_zarr)
    grid = spatial(meta)
    if split.channels != int(meta["in_chans"]) or list(split.images.shape[2:]) != grid:
        raise ValueError(f"{test_zarr} holds {split.channels}×{'x'.join(map(str, split.images.shape[2:]))} samples "
                         f"but {model_pt} takes {meta['in_chans']}×{'x'.join(map(str, grid))}: give the same "
                         "project's test split")
    if len(grid) == 3:
        batch_size = min(batch_size, 4)  # volumes: a few at a time
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst, n = 0.0, 0
    with torch.inference_mode():
        for x, _ in split.batches(batch_size, shuffle=False):
            x = normalize(x, split.mean, split.std)
            expected = task.scores(model(x)).numpy()
            logits = session.run(["logits"], {"images": x.numpy()})[0]
            got = task.scores(torch.from_numpy(logits)).numpy()
            worst = max(worst, float(np.abs(expected - got).max()))
            n += len(x)
    return worst, n


def export_and_check(model_pt: str | Path, test_zarr: str | Path, onnx_path: str | Path,
                     opset: int = OPSET, tolerance: float = TOLERANCE) -> dict:
    """Export, check parity on the test split; the record ``onnx.json`` holds.  Raises
    :class:`ParityError` (after the record is complete) when parity fails."""
    record = export(model_pt, onnx_path, opset)
    diff, n = parity(model_pt, onnx_path, test_zarr)
    if n == 0:
        raise ValueError(f"{test_zarr} has no samples: parity needs the project's test split")
    record.update(max_abs_diff=diff, n=n, tolerance=tolerance, passed=bool(diff <= tolerance))
    log.info("ONNX opset %d: max abs difference of probabilities %.3g over %d test samples", opset, diff, n)
    return record
