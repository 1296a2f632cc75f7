"""haven predict: the DAG's predict stage (--manifest ...), or by hand on a folder of new files
(SRC DST: the same gate as `haven deid`, then the prediction)."""

from __future__ import annotations

import json
from pathlib import Path

from haven.cli.common import settings, stage_args


def _bundle(args, s: dict):
    from haven.predict.resolve import bundle_for

    if args.model and not Path(args.model).is_file() and ":/" in args.model:  # an MLflow URI by hand
        s = {**s, "predict": {**s["predict"], "model": args.model}}
        return bundle_for(s)
    return bundle_for(s, model=Path(args.model) if args.model else None,
                      evaluation=Path(args.evaluation) if args.evaluation else None,
                      registered=Path(args.registered) if args.registered else None)


def cmd_predict(args) -> int:
    import torch

    from haven.learn.preprocess import Inputs
    from haven.predict.stage import predict

    s = settings(args, "predict")
    torch.set_num_threads(int(s["predict"]["threads"]))
    bundle = _bundle(args, s)
    if args.src:
        return _by_hand(args, s, bundle)
    if not (args.manifest and args.audit and args.data and args.predictions and args.summary):
        raise ValueError("haven predict needs SRC DST, or the stage's files: --manifest --audit --data "
                         "--predictions --summary")
    summary = predict(Inputs(Path(args.manifest), Path(args.audit), Path(args.data)), bundle,
                      Path(args.predictions), Path(args.summary), batch_size=int(s["predict"]["batch_size"]),
                      workers=int(s["predict"]["threads"]), masks=Path(args.masks) if args.masks else None)
    print(json.dumps({k: summary[k] for k in ("files", "predicted", "not_decoded", "per_class")}))
    return 0


def _by_hand(args, s: dict, bundle) -> int:
    """SRC → DST/deid (the gate, as `haven deid` with the project's anonymize settings) → DST/predictions.csv."""
    from haven import config as cfg
    from haven.cli.deidentify import _key
    from haven.deid.oneshot import deidentify
    from haven.learn.preprocess import Inputs
    from haven.predict.stage import predict

    if not args.dst:
        raise ValueError("haven predict SRC DST: give DST, the folder for the de-identified files and predictions")
    dst = Path(args.dst)
    options = cfg.stage_settings(cfg.load(args.config), args.project, "anonymize")["anonymize"] if args.config else {}
    gate = deidentify(Path(args.src), dst / "deid", _key(args), options=options,
                      work=Path(args.work) if args.work else None, label_folders=False)
    if not gate["audit_passed"]:
        print(f"audit FAILED ({gate['findings']} finding(s), see {gate['audit']}): nothing predicted")
        return 1
    summary = predict(Inputs(Path(gate["manifest"]), Path(gate["audit"]), Path(gate["data"])), bundle,
                      dst / "predictions.csv", dst / "summary.json", batch_size=int(s["predict"]["batch_size"]),
                      masks=dst / "masks" if bundle.task.targets == "masks" else None)
    print(f"{summary['files']} file(s): {summary['predicted']} predicted, {summary['not_decoded']} not decoded; "
          f"per class {summary['per_class']}; predictions: {dst / 'predictions.csv'}")
    print(f"PHI zone (original identifiers; keep private): {gate['phi']}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("predict", help="apply a trained model to audited new data (the DAG's stage), or to a "
                                       "folder by hand: SRC DST (de-identified and audited first)")
    p.add_argument("src", nargs="?", help="by hand: a folder of new DICOM files or images")
    p.add_argument("dst", nargs="?", help="by hand: folder for the de-identified files and predictions.csv")
    p.add_argument("--manifest", help="stage: the predict source's anonymize manifest")
    p.add_argument("--audit", help="stage: its audit.json (nothing that did not pass is read)")
    p.add_argument("--data", help="stage: the folder the manifest's `file` column is relative to")
    p.add_argument("--predictions", help="stage output: predictions.csv")
    p.add_argument("--summary", help="stage output: summary.json")
    p.add_argument("--masks", help="stage output: the folder of a segmentation's predicted masks (PNG, NIfTI, "
                                   "DICOM-SEG); another task writes a README there saying it predicts none")
    p.add_argument("--model", help="the train stage's model.pt, or an MLflow model URI (models:/..., runs:/...)")
    p.add_argument("--evaluation", help="evaluate's metrics.json (temperature, decision rule) beside --model")
    p.add_argument("--registered", help="the register stage's registered.json (predict its champion)")
    p.add_argument("--key-file", help="by hand: the pseudonymization key")
    p.add_argument("--key-env", help="by hand: environment variable holding the key (default HAVEN_KEY)")
    p.add_argument("--work", help="by hand: private folder for the PHI-zone tables")
    stage_args(p)
    p.set_defaults(func=cmd_predict)
