"""The application: lifespan (manager and batcher), error mapping, and the routes that are not
inference: health, readiness, models, metrics, Open Inference Protocol health and metadata.

The inference routes themselves (`/predict`, TensorFlow Serving's `:predict`, the Open
Inference Protocol's `/infer`) are the pure ASGI layer of `service.inference_routes`, which
`create_app` puts in front of FastAPI. No TensorFlow here.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import codec
from service.batching import Batcher
from service.config import Settings
from service.errors import ServiceError
from service.inference_routes import InferenceRoutes
from service.manager import Loader, ModelManager
from service.metrics import CONTENT_TYPE, ServiceMetrics

log = logging.getLogger(__name__)
JSON = "application/json"


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    return Response(codec.encode({"error": message}), status_code=status, media_type=JSON, headers=headers)


def default_loader(settings: Settings) -> Loader:
    """The real loader: TensorFlow is imported here, on first use, not at module import."""
    def load(manifest, path):
        from service.ensemble import load_ensemble

        return load_ensemble(manifest, path, settings.warmup_batch_sizes)

    return load


def tensorflow_threads(intra: int, inter: int, workers: int, cores: int) -> tuple[int, int]:
    """Thread pool sizes; 0 means automatic: the worker's share of the cores for intra-op (a
    large batch needs them all), and one inter-op thread (one batch runs at a time, and more
    threads only compete with the event loop)."""
    return (intra or max(1, cores // workers), inter or 1)


def configure_tensorflow(settings: Settings) -> None:
    """Thread pools must be set before TensorFlow runs its first op."""
    import tensorflow as tf

    intra, inter = tensorflow_threads(settings.intra_op_threads, settings.inter_op_threads,
                                      settings.workers, os.cpu_count() or 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as exc:  # already initialised (e.g. several apps in one test process)
        log.warning("TensorFlow threads not changed: %s", exc)


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
) -> InferenceRoutes:
    """The ASGI application (inference routes in front of FastAPI); pass settings, a metrics
    object and a loader to replace the defaults. `.app` is the FastAPI application."""
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
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error(exc.status, str(exc))

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
        ready, reason = manager_of(request).readiness(settings.default_model)
        return Response(codec.encode({"ready": ready, "reason": reason}), 200 if ready else 503, media_type=JSON)

    @app.get("/models")
    async def models(request: Request) -> Response:
        return Response(codec.encode({"models": manager_of(request).status()}), media_type=JSON)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

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
