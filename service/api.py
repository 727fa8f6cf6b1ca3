"""The application: lifespan (manager and batcher), error mapping, and the routes that are not
inference: health, readiness, models, metrics, Open Inference Protocol health and metadata.

The inference routes themselves (`/predict`, TensorFlow Serving's `:predict`, the Open
Inference Protocol's `/infer`) are the pure ASGI layer of `service.inference_routes`, which
`create_app` puts in front of FastAPI. No TensorFlow here.
"""

from __future__ import annotations

import hmac
import logging
import os
import sys
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import codec
from service.batching import Batcher
from service.config import Settings
from service.errors import Forbidden, ServiceError, Unauthorized
from service.inference_routes import ROUTES, InferenceRoutes
from service.engines.child import stop_all
from service.engines.loader import EngineLoader, plan_of
from service.lifecycle.manager import Loader, ModelManager
from service.lifecycle.memory import tune_garbage_collector
from service.lifecycle.pins import PinStore
from service.metrics import CONTENT_TYPE, ServiceMetrics

log = logging.getLogger(__name__)
JSON = "application/json"


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    return Response(codec.encode({"error": message}), status_code=status, media_type=JSON, headers=headers)


_ROWS = {"type": "array", "minItems": 1, "description": "one instance per row, each of the "
         "manifest's input shape (nested lists of numbers)", "items": {}}
_TFS_BODY = {"type": "object", "properties": {"instances": _ROWS, "inputs": _ROWS},
             "description": "row format ('instances') or columnar format ('inputs')"}
_V2_BODY = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "inputs": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": ["FP32", "FP64", "INT32", "INT64", "UINT8"]},
            "data": {"type": "array", "items": {}},
            "parameters": {"type": "object"}}}},
    "outputs": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "enum": ["probabilities", "members"]},
        "parameters": {"type": "object"}}}}}}
# Schema documentation of the inference handlers; their paths come from inference_routes.ROUTES.
INFERENCE_DOCS = {
    "predict": ("Predict with the default ensemble (?members=true adds each member's answer)",
                {"type": "object", "required": ["instances"], "properties": {"instances": _ROWS}}),
    "tfs_predict": ("TensorFlow Serving REST predict (row or columnar format)", _TFS_BODY),
    "v2_infer": ("Open Inference Protocol infer (JSON, or binary tensors with "
                 "Inference-Header-Content-Length)", _V2_BODY),
}


async def _answered_in_front() -> Response:
    """Never called: InferenceRoutes answers these paths before FastAPI sees them."""
    return _error(404, "not found")


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
            self.metrics.observe_request(route, status, time.perf_counter() - started)


def create_app(
    settings: Settings | None = None,
    metrics: ServiceMetrics | None = None,
    loader: Loader | None = None,
) -> InferenceRoutes:
    """The ASGI application (inference routes in front of FastAPI); pass settings, a metrics
    object and a loader to replace the defaults. `.app` is the FastAPI application."""
    settings = settings or Settings()
    metrics = metrics or ServiceMetrics()

    threads = plan_of(settings, os.cpu_count() or 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tune_garbage_collector()
        switch_interval = sys.getswitchinterval()
        if settings.switch_interval_ms:
            sys.setswitchinterval(settings.switch_interval_ms / 1000)
        manager = ModelManager(settings.repository, loader or EngineLoader(settings, threads), metrics,
                               settings.version_policy, settings.poll_interval_seconds,
                               settings.default_model, PinStore(settings.state_dir),
                               settings.loader_duty_cycle)
        batcher = Batcher(settings.max_batch_size, settings.max_batch_delay_ms / 1000,
                          settings.max_queue_rows, on_batch=metrics.observe_batch,
                          on_depth=metrics.queue_depth.set, threads=threads.inference_threads)
        app.state.manager, app.state.batcher = manager, batcher
        batcher.start()
        await manager.start()
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for the requests it had; whatever is
            # still queued gets the rest of the grace period before it is failed.
            if not await batcher.drain(settings.shutdown_grace_seconds):
                log.warning("shutdown: the queue did not drain in %.0f s", settings.shutdown_grace_seconds)
            await manager.stop()
            stop_all()  # a version still compiling, or waiting for another worker's compile, is not needed
            await batcher.stop()
            sys.setswitchinterval(switch_interval)

    app = FastAPI(title="ensemble-serving", version="0.1.0", lifespan=lifespan)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.state.settings = settings
    app.state.metrics = metrics

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
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

    # -- liveness, readiness, state, metrics ----------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"alive"}', media_type=JSON)

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        ready, reason = manager_of(request).readiness()
        return Response(codec.encode({"ready": ready, "reason": reason}), 200 if ready else 503, media_type=JSON)

    @app.get("/models")
    async def models(request: Request) -> Response:
        return Response(codec.encode({"models": manager_of(request).status()}), media_type=JSON)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    # -- admin: reload, rollback, pin ----------------------------------------------------------

    def admin(request: Request) -> ModelManager:
        """Bearer-token check of the admin routes; disabled (403) when no token is configured."""
        if settings.admin_token is None:
            raise Forbidden("admin routes are disabled: set ENSEMBLE_ADMIN_TOKEN to enable them")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = settings.admin_token.get_secret_value().encode()
        # Constant time: the comparison must not tell an attacker how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise Unauthorized("admin routes need the header 'Authorization: Bearer <ENSEMBLE_ADMIN_TOKEN>'")
        return manager_of(request)

    def _state(body: dict) -> Response:
        return Response(codec.encode(body), media_type=JSON)

    @app.post("/models/{name}/reload")
    async def reload(name: str, manager: ModelManager = Depends(admin)) -> Response:
        """Check the repository for `name` now instead of at the next poll."""
        return _state(await manager.reload(name))

    @app.post("/models/{name}/rollback")
    async def rollback(name: str, manager: ModelManager = Depends(admin)) -> Response:
        """Serve the previous version again at once, pinned until DELETE /models/{name}/pin."""
        return _state(await manager.rollback(name))

    @app.post("/models/{name}/pin/{version}")
    async def pin(name: str, version: int = PathParam(ge=1),
                  manager: ModelManager = Depends(admin)) -> Response:
        """Serve `version` (loading and checking it first), whatever is published later."""
        return _state(await manager.pin(name, version))

    @app.delete("/models/{name}/pin")
    async def unpin(name: str, manager: ModelManager = Depends(admin)) -> Response:
        """Follow the configured policy again (normally: the newest good version)."""
        return _state(await manager.unpin(name))

    # -- inference routes: answered by service.inference_routes, listed here for the schema ----

    for path, _, handler in ROUTES:
        summary, body_schema = INFERENCE_DOCS[handler]
        params = [{"name": p, "in": "path", "required": True,
                   "schema": {"type": "integer", "minimum": 1} if p == "version" else {"type": "string"}}
                  for p in ("name", "version") if f"{{{p}}}" in path]
        app.add_api_route(path, _answered_in_front, methods=["POST"], summary=summary,
                          openapi_extra={"parameters": params, "requestBody": {
                              "required": True, "content": {"application/json": {"schema": body_schema}}}})

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
        ready, _ = manager_of(request).readiness()
        return Response(codec.encode({"ready": ready}), 200 if ready else 503, media_type=JSON)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model(request: Request, name: str, version: int | None = None) -> Response:
        ensemble = manager_of(request).get(name, version)
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

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(request: Request, name: str, version: int | None = None) -> Response:
        manager_of(request).get(name, version)
        return Response(codec.encode({"name": name, "ready": True}), media_type=JSON)

    return InferenceRoutes(app, settings, metrics)
