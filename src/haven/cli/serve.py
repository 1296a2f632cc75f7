"""haven serve: the REST service of a project's model (FastAPI on uvicorn, :mod:`haven.predict.serve`)."""

from __future__ import annotations

import logging
from pathlib import Path

from haven.cli.common import settings, stage_args

log = logging.getLogger("haven.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _bundle(args, s: dict):
    """The model to serve: --model (a model.pt or an MLflow URI), else the project's as predict picks
    it (``predict.model``: the champion of track/registered.json, this run's train files, or a URI)."""
    from haven.predict.resolve import bundle_for

    if args.model and not Path(args.model).is_file() and ":/" in args.model:  # an MLflow URI
        return bundle_for({**s, "predict": {**s["predict"], "model": args.model}})
    if args.model:
        return bundle_for(s, model=_existing(Path(args.model)),
                          evaluation=_existing(Path(args.evaluation)) if args.evaluation else None)
    root = Path(s["results"]) / s["project"]
    choice = s["predict"]["model"]
    if choice == "this_run" or (choice == "champion" and not s.get("register_models", True)):
        return bundle_for(s, model=_existing(root / "train" / "model.pt"), evaluation=root / "evaluate" / "metrics.json")
    if choice == "champion":
        return bundle_for(s, registered=_existing(root / "track" / "registered.json"))
    return bundle_for(s)  # an MLflow URI in the config


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the project's pipeline first (it trains, evaluates and "
                                "registers the model), or give --model model.pt [--evaluation metrics.json]")
    return path


def _card(args, s: dict) -> str | None:
    if args.card:
        return _existing(Path(args.card)).read_text()
    card = Path(s["results"]) / s["project"] / "report" / "model_card.md"
    return card.read_text() if card.is_file() and not args.model else None


def cmd_serve(args) -> int:
    import torch
    import uvicorn

    from haven.predict.serve import create_app
    from haven.predict.uploads import Limits, MiB

    s = settings(args, "predict")
    torch.set_num_threads(int(args.threads or s["predict"]["threads"]))
    bundle = _bundle(args, s)
    limits = Limits(request_bytes=int(args.max_request_mb * MiB), files=args.max_files, pixels=args.max_pixels,
                    frames=args.max_frames)
    app = create_app(bundle, card=_card(args, s), limits=limits)
    if args.host not in LOOPBACK:
        log.warning("listening on %s, beyond this machine: the service has no authentication or TLS of its own, "
                    "put it behind a proxy that has", args.host)
    # uvicorn's access log would print each request line, query string included: _Guard logs instead
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, log_level="info", access_log=False,
                server_header=False, limit_concurrency=args.max_connections)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained model over HTTP (POST /predict, GET /model, GET /health, "
                                     "/docs); binds to 127.0.0.1 unless --host says otherwise")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="the train stage's model.pt, or an MLflow model URI (models:/..., runs:/...); "
                                   "default: the project's model as predict.model picks it")
    p.add_argument("--evaluation", help="evaluate's metrics.json (temperature, decision rule) beside --model")
    p.add_argument("--card", help="model card markdown for GET /model (default: the project's report/model_card.md)")
    p.add_argument("--threads", type=int, help="torch threads (default: predict.threads)")
    p.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body (413 beyond)")
    p.add_argument("--max-files", type=int, default=64, help="most files in one request")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image, rows x columns")
    p.add_argument("--max-frames", type=int, default=256, help="most frames of a multi-frame DICOM")
    p.add_argument("--max-connections", type=int, default=64, help="concurrent connections (503 beyond)")
    stage_args(p)
    p.set_defaults(func=cmd_serve)
