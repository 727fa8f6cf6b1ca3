"""HTTP routes. Thin: parse, hand to the batcher with the ensemble the manager resolved, encode.

Three request formats share one batcher and one ensemble per version: `POST /predict` and
TensorFlow Serving's `POST /v1/models/{name}[/versions/{v}]:predict` (row `instances` or
columnar `inputs`), and the Open Inference Protocol's `POST /v2/models/{name}[/versions/{v}]/infer`
(JSON or binary tensors). No TensorFlow here.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import codec
from service.batching import Batcher
from service.config import Settings
from service.errors import DeadlineExceeded, InvalidInput, PayloadTooLarge, QueueFull, ServiceError
from service.manager import Loader, ModelManager
from service.metrics import CONTENT_TYPE, ServiceMetrics

log = logging.getLogger(__name__)
JSON = "application/json"
TIMEOUT_HEADER = "x-request-timeout-ms"
V2_HEADER_LENGTH = "inference-header-content-length"
_REJECT_REASONS = {QueueFull: "queue_full", DeadlineExceeded: "deadline", PayloadTooLarge: "too_large"}


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    return Response(codec.encode({"error": message}), status_code=status, media_type=JSON, headers=headers)


def default_loader(settings: Settings) -> Loader:
    """The real loader: TensorFlow is imported here, on first use, not at module import."""
    def load(manifest, path):
        from service.ensemble import load_ensemble

        return load_ensemble(manifest, path, settings.warmup_batch_sizes)

    return load


def configure_tensorflow(settings: Settings) -> None:
    """Thread pools must be set before TensorFlow runs its first op."""
    import tensorflow as tf

    try:
        if settings.intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(settings.intra_op_threads)
        if settings.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(settings.inter_op_threads)
    except RuntimeError as exc:  # already initialised (e.g. several apps in one test process)
        log.warning("TensorFlow threads not changed: %s", exc)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) before reading past the configured limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _deadline(request: Request, default_ms: float) -> float | None:
    """Monotonic time by which the request must have left the queue, or None."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return time.monotonic() + default_ms / 1000 if default_ms > 0 else None
    try:
        ms = float(raw)
    except ValueError:
        raise InvalidInput(f"X-Request-Timeout-Ms must be a number of milliseconds, got {raw!r}") from None
    if not ms > 0:
        raise InvalidInput("X-Request-Timeout-Ms must be positive")
    return time.monotonic() + ms / 1000


class RequestMetrics:
    """Pure ASGI middleware: counts and times every HTTP request by route template and status."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - started)


def create_app(
    settings: Settings | None = None,
    metrics: ServiceMetrics | None = None,
    loader: Loader | None = None,
) -> FastAPI:
    """The application: pass settings, a metrics object and a loader to replace the defaults."""
    settings = settings or Settings()
    metrics = metrics or ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is None:
            configure_tensorflow(settings)
        manager = ModelManager(settings.repository, loader or default_loader(settings), metrics,
                               settings.version_policy, settings.poll_interval_seconds)
        batcher = Batcher(settings.max_batch_size, settings.max_batch_delay_ms / 1000,
                          settings.max_queue_rows, on_batch=metrics.observe_batch,
                          on_depth=metrics.queue_depth.set)
        app.state.manager, app.state.batcher = manager, batcher
        batcher.start()
        await manager.start()
        try:
            yield
        finally:
            await manager.stop()
            await batcher.stop()

    app = FastAPI(title="ensemble-serving", version="0.1.0", lifespan=lifespan)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.state.settings = settings
    app.state.metrics = metrics

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        reason = _REJECT_REASONS.get(type(exc))
        if reason:
            metrics.rejected.labels(reason).inc()
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": "1"} if isinstance(exc, QueueFull) else None
        return _error(exc.status, str(exc), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg')}")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("%s %s failed unexpectedly", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    def manager_of(request: Request) -> ModelManager:
        return request.app.state.manager

    async def infer(request: Request, ensemble, x):
        """(averaged, per-member) probabilities of x, computed in a batch."""
        result = await request.app.state.batcher.submit(ensemble, x, _deadline(request, settings.request_timeout_ms))
        metrics.predicted_rows.labels(ensemble.name).inc(len(x))
        return result

    async def predict_rows(request: Request, ensemble, members: bool) -> Response:
        payload = codec.parse_json_object(await _read_body(request, settings.max_body_bytes))
        columnar = "inputs" in payload and "instances" not in payload
        if columnar:
            x = codec.columnar_inputs(payload["inputs"], ensemble.input_spec, settings.max_rows_per_request)
        else:
            x = codec.instances_to_array(payload.get("instances"), ensemble.input_spec,
                                         settings.max_rows_per_request)
        average, per_member = await infer(request, ensemble, x)
        body: dict[str, Any] = {
            "outputs" if columnar else "predictions": average,
            "labels": codec.predicted_labels(average, ensemble.classes),
            "classes": list(ensemble.classes),
            "model": {"name": ensemble.name, "version": ensemble.version},
        }
        if members:
            body["members"] = codec.members_by_name(per_member, [m.name for m in ensemble.manifest.members])
            body["disagreement"] = codec.disagreement(per_member, average)
        return Response(codec.encode(body), media_type=JSON)

    # -- liveness, readiness, state, metrics ----------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"alive"}', media_type=JSON)

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        ready, reason = manager_of(request).readiness(settings.default_model)
        return Response(codec.encode({"ready": ready, "reason": reason}), 200 if ready else 503, media_type=JSON)

    @app.get("/models")
    async def models(request: Request) -> Response:
        return Response(codec.encode({"models": manager_of(request).status()}), media_type=JSON)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    # -- predict: this service's and TensorFlow Serving's --------------------------------------

    @app.post("/predict")
    async def predict(request: Request, members: bool = False) -> Response:
        """TensorFlow Serving row format in; probabilities, labels and the version out."""
        manager = manager_of(request)
        return await predict_rows(request, manager.get(manager.default_name(settings.default_model)), members)

    @app.post("/v1/models/{name}:predict")
    async def tfs_predict(request: Request, name: str, members: bool = False) -> Response:
        return await predict_rows(request, manager_of(request).get(name), members)

    @app.post("/v1/models/{name}/versions/{version}:predict")
    async def tfs_predict_version(request: Request, name: str, version: int, members: bool = False) -> Response:
        return await predict_rows(request, manager_of(request).get(name, version), members)

    # -- Open Inference Protocol (KServe V2) ----------------------------------------------------

    @app.get("/v2")
    async def v2_server_metadata() -> Response:
        return Response(codec.encode({"name": "ensemble-serving", "version": "0.1.0",
                                      "extensions": ["binary_tensor_data"]}), media_type=JSON)

    @app.get("/v2/health/live")
    async def v2_live() -> Response:
        return Response(b'{"live":true}', media_type=JSON)

    @app.get("/v2/health/ready")
    async def v2_ready(request: Request) -> Response:
        ready, _ = manager_of(request).readiness(settings.default_model)
        return Response(codec.encode({"ready": ready}), 200 if ready else 503, media_type=JSON)

    def v2_metadata(ensemble) -> Response:
        spec = ensemble.input_spec
        body = {
            "name": ensemble.name,
            "versions": [str(ensemble.version)],
            "platform": "tensorflow_savedmodel_ensemble",
            "inputs": [{"name": "instances", "datatype": codec.v2_datatype(spec.dtype), "shape": [-1, *spec.shape]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(ensemble.classes)]},
                {"name": "members", "datatype": "FP32",
                 "shape": [-1, len(ensemble.manifest.members), len(ensemble.classes)]},
            ],
            "parameters": {"classes": list(ensemble.classes),
                           "members": [m.name for m in ensemble.manifest.members]},
        }
        return Response(codec.encode(body), media_type=JSON)

    @app.get("/v2/models/{name}")
    async def v2_model(request: Request, name: str) -> Response:
        return v2_metadata(manager_of(request).get(name))

    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model_version(request: Request, name: str, version: int) -> Response:
        return v2_metadata(manager_of(request).get(name, version))

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(request: Request, name: str) -> Response:
        manager_of(request).get(name)
        return Response(codec.encode({"name": name, "ready": True}), media_type=JSON)

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_version_ready(request: Request, name: str, version: int) -> Response:
        manager_of(request).get(name, version)
        return Response(codec.encode({"name": name, "ready": True}), media_type=JSON)

    async def v2_infer_with(request: Request, ensemble) -> Response:
        body = await _read_body(request, settings.max_body_bytes)
        head, binary = codec.split_binary_body(body, request.headers.get(V2_HEADER_LENGTH))
        payload = codec.parse_json_object(head)
        x = codec.v2_input_array(payload, binary, ensemble.input_spec, settings.max_rows_per_request)
        wanted, binary_outputs = codec.v2_wants(payload)
        average, per_member = await infer(request, ensemble, x)
        tensors = {n: (average if n == "probabilities" else per_member) for n in wanted}
        content, header_length = codec.v2_response(ensemble.name, ensemble.version, payload.get("id"),
                                                   tensors, binary_outputs)
        if header_length is None:
            return Response(content, media_type=JSON)
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(request: Request, name: str) -> Response:
        return await v2_infer_with(request, manager_of(request).get(name))

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer_version(request: Request, name: str, version: int) -> Response:
        return await v2_infer_with(request, manager_of(request).get(name, version))

    return app
