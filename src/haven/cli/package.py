"""haven export-onnx: the trained network as ONNX, checked against torch on the test split."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_export_onnx(args) -> int:
    import logging

    import torch

    from haven.io import atomic_write_text
    from haven.predict.onnx import OPSET, TOLERANCE, export_and_check

    for chatty in ("onnxscript", "onnx_ir"):  # the exporter's pass-by-pass notes
        logging.getLogger(chatty).setLevel(logging.WARNING)
    s = json.loads(args.params) if args.params else {}
    if s.get("threads"):
        torch.set_num_threads(int(s["threads"]))
    opset = int(args.opset if args.opset is not None else s.get("opset", OPSET))
    tolerance = float(args.tolerance if args.tolerance is not None else s.get("tolerance", TOLERANCE))
    record = export_and_check(Path(args.model), Path(args.test), Path(args.onnx), opset=opset, tolerance=tolerance)
    atomic_write_text(Path(args.report), json.dumps(record, indent=2, default=str))
    print(f"ONNX opset {opset} ({record['exporter']}): max abs difference of probabilities {record['max_abs_diff']:.3g} "
          f"over {record['n']} test samples (tolerance {tolerance:g})")
    if not record["passed"]:
        # the report stays for inspection; the non-zero exit keeps the graph from being registered
        print(f"haven export-onnx: error: ONNX parity failed ({record['max_abs_diff']:.3g} > {tolerance:g}) for "
              f"{args.onnx}; do not deploy it: see {args.report}, try another --opset, or report the backbone",
              file=sys.stderr)
        return 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("export-onnx", help="the trained network as ONNX, with onnxruntime parity on the test split")
    p.add_argument("--model", required=True, help="the train stage's model.pt")
    p.add_argument("--test", required=True, help="the preprocess stage's test.zarr (the parity check's samples)")
    p.add_argument("--onnx", required=True, help="where to write model.onnx")
    p.add_argument("--report", required=True, help="where to write onnx.json (opset, exporter, max_abs_diff, n, passed)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    p.add_argument("--tolerance", type=float, help="largest allowed abs difference of probabilities (default 1e-4)")
    p.add_argument("--params", help="settings as JSON (optional keys: threads, opset, tolerance)")
    p.set_defaults(func=cmd_export_onnx)
