"""The REST service of a trained model (``haven serve``): FastAPI on uvicorn.

* ``POST /predict``: one or several files (multipart parts named ``files``: DICOM, PNG, JPEG, ...)
  → a JSON list, one entry per file in the order sent: ``p_<class>``, ``pcal_<class>``,
  ``predicted``, ``model``, ``model_version``, ``input_hash`` (:meth:`Bundle.predict`, so the same
  answer as ``haven predict`` on the same file) and the file's ``kind``;
* ``GET /model``: :meth:`Bundle.describe` and the model card (markdown); ``GET /health``;
  ``/docs`` and ``/openapi.json``: FastAPI's own.

Safe by construction: a request's bytes stay in memory (:mod:`haven.predict.uploads`: its own
multipart split, since Starlette's spools uploads over 1 MiB to disk); a DICOM's header is
de-identified in memory before it is read for anything; limits on the request and image size are
checked before any pixel is decoded; a bad file gets a 4xx with the reason; an unforeseen error
gets a generic 500 without details.  The log (:class:`_Guard`) has one line per request with only
a server-made request id, the route (a known one, else ``-``), the status, the byte count, the
latency and for predictions the files' kinds and predicted classes: no query string, no file name,
no header value, no exception message.  Libraries that may quote header values in warnings or log
records (pydicom) are silenced for the whole process (:func:`quiet_process`).
"""

# no `from __future__ import annotations`: FastAPI resolves the routes' annotations (Request,
# imported inside create_app) from the live objects
import logging
import time
import uuid

from haven.predict.uploads import Limits, Rejected, check, read_body, split_form

log = logging.getLogger("haven.serve")

ROUTES = ("/predict", "/model", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")
_FILES_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                             "description": "DICOM, PNG or JPEG files, one part each"}}}}}}}


def quiet_process() -> None:
    """Silence, process-wide, what may quote a request's content: Python warnings (pydicom words
    invalid values into them) and pydicom's logger.  Process-wide because ``warnings.catch_warnings``
    is not thread-safe and requests are decoded on several threads at once."""
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    for name in ("PIL", "python_multipart", "multipart"):
        logging.getLogger(name).setLevel(logging.WARNING)


def create_app(bundle, *, card: str | None = None, limits: Limits | None = None):
    """The FastAPI app serving ``bundle`` (:class:`haven.predict.bundle.Bundle`); ``card``: the
    model card's markdown for ``GET /model``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    limits = limits or Limits()
    quiet_process()
    app = FastAPI(title=f"haven model {bundle.name or 'service'}", version=str(bundle.version or "0"),
                  description="Predictions of a haven model on DICOM, PNG or JPEG files, preprocessed as in "
                              "training. Nothing sent is stored or logged.")

    @app.exception_handler(Rejected)
    async def rejected(request: Request, exc: Rejected):
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    @app.get("/health")
    def health() -> dict:
        """Whether the service is up, and the model it serves."""
        return {"status": "ok", "model": bundle.name, "model_version": bundle.version}

    @app.get("/model")
    def model() -> dict:
        """What the model is (task, classes, preprocessing, calibration, decision rule, test metrics)
        and its model card (markdown, or null)."""
        return {**bundle.describe(), "card": card}

    @app.post("/predict", openapi_extra=_FILES_BODY)
    async def predict(request: Request) -> list[dict]:
        """One entry per file sent, in order: probabilities ``p_<class>``, calibrated ``pcal_<class>``,
        the ``predicted`` class, the model's name and version, and ``input_hash`` (of the array the
        network saw).  A bad file refuses the whole request (4xx, the reason names the file's place)."""
        body = await read_body(request.stream(), request.headers.get("content-length"), limits.request_bytes)
        uploads = split_form(body, request.headers.get("content-type", ""), limits)
        rows = await run_in_threadpool(predict_uploads, bundle, uploads, limits)
        request.state.summary = (f"files={len(rows)} kinds={','.join(r['kind'] for r in rows)} "
                                 f"predicted={','.join(r['predicted'] for r in rows)}")
        return rows

    app.add_middleware(_Guard)
    return app


def predict_uploads(bundle, uploads: list, limits: Limits) -> list[dict]:
    """Every upload checked (before any is decoded), decoded as in training, then one prediction
    batch (:meth:`Bundle.predict`)."""
    import numpy as np

    mode = bundle.pixels["mode"]
    kinds = []
    for i, upload in enumerate(uploads):
        try:
            kinds.append(check(upload, mode, limits))
        except Rejected as e:
            raise Rejected(e.status, f"file {i + 1} of {len(uploads)}: {e.reason}") from None
    samples = []
    for i, upload in enumerate(uploads):
        try:
            # the suffix only: sample_bytes decides the kind from it and the bytes, as check did
            sample, _ = bundle.sample_bytes(upload.data, "upload" + upload.suffix)
        except Exception as e:
            raise Rejected(422, f"file {i + 1} of {len(uploads)}: its pixels cannot be decoded "
                                f"({type(e).__name__}: {str(e)[:200]}): a truncated or damaged file?") from None
        samples.append(sample)
    rows = bundle.predict(np.stack(samples))
    return [{"file": i + 1, "kind": kind, **row} for i, (kind, row) in enumerate(zip(kinds, rows))]


class _Guard:
    """Pure ASGI middleware around the routes: a request id (made here, never taken from the
    client), one content-free log line per request, and a generic 500 for anything unforeseen (the
    exception stops here: Starlette's ServerErrorMiddleware would hand its traceback, message
    included, to the server's log)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:12]
        state = scope.setdefault("state", {})
        started, seen = time.perf_counter(), {"status": 0, "bytes": 0}

        async def counting_receive():
            message = await receive()
            seen["bytes"] += len(message.get("body", b""))
            return message

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, counting_receive, tagged_send)
        except Exception as e:  # noqa: BLE001 - the one place that turns anything unforeseen into a 500
            where = e.__traceback__
            while where is not None and where.tb_next is not None:
                where = where.tb_next
            log.error("request %s internal error %s at %s:%s", rid, type(e).__name__,
                      where.tb_frame.f_code.co_filename if where else "?", where.tb_lineno if where else "?")
            if not seen["status"]:
                await _internal_error(scope, tagged_send, rid)
        route = scope.get("path", "") if scope.get("path", "") in ROUTES else "-"
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        size = max(seen["bytes"], int(declared) if declared.isdigit() else 0)  # a refused body is not read
        log.info("request %s %s %s status=%d bytes=%d ms=%.1f %s", rid, scope.get("method", ""), route,
                 seen["status"], size, 1000 * (time.perf_counter() - started), state.get("summary", ""))


async def _internal_error(scope, send, rid: str) -> None:
    from fastapi.responses import JSONResponse

    response = JSONResponse({"detail": f"internal error (request {rid}): nothing about it is returned or logged "
                                       "but its id; tell the service's operator"}, status_code=500)
    await response(scope, None, send)
