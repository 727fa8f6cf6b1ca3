"""HTTP routes. Thin: parse, hand to the manager and the ensemble, encode. No TensorFlow here."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import codec
from service.config import Settings
from service.errors import PayloadTooLarge, ServiceError
from service.manager import Loader, ModelManager
from service.metrics import CONTENT_TYPE, ServiceMetrics

log = logging.getLogger(__name__)
JSON = "application/json"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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
        app.state.manager = manager
        await manager.start()
        try:
            yield
        finally:
            await manager.stop()

    app = FastAPI(title="ensemble-serving", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            metrics.requests.labels(template, str(status)).inc()
            metrics.request_duration.labels(template).observe(time.perf_counter() - started)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        if exc.status >= 500 and exc.status != 503:
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

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(request: Request):
        ready, reason = request.app.state.manager.readiness(settings.default_model)
        return JSONResponse({"ready": ready, "reason": reason}, status_code=200 if ready else 503)

    @app.get("/models")
    async def models(request: Request) -> dict:
        return {"models": request.app.state.manager.status()}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    async def answer(request: Request, ensemble, members: bool) -> Response:
        payload = codec.parse_json_object(await _read_body(request, settings.max_body_bytes))
        x = codec.instances_to_array(payload.get("instances"), ensemble.input_spec,
                                     settings.max_rows_per_request)
        average, per_member = await asyncio.to_thread(ensemble.predict, x)
        metrics.predicted_rows.labels(ensemble.name).inc(len(x))
        body: dict[str, Any] = {
            "predictions": average,
            "labels": codec.predicted_labels(average, ensemble.classes),
            "classes": list(ensemble.classes),
            "model": {"name": ensemble.name, "version": ensemble.version},
        }
        if members:
            body["members"] = codec.members_by_name(per_member, [m.name for m in ensemble.manifest.members])
            body["disagreement"] = codec.disagreement(per_member, average)
        return Response(codec.encode(body), media_type=JSON)

    @app.post("/predict")
    async def predict(request: Request, members: bool = False) -> Response:
        """TensorFlow Serving row format in; probabilities, labels and the version out."""
        manager: ModelManager = request.app.state.manager
        return await answer(request, manager.live(manager.default_name(settings.default_model)), members)

    @app.post("/v1/models/{name}:predict")
    async def predict_named(request: Request, name: str, members: bool = False) -> Response:
        """The same, for a named ensemble (TensorFlow Serving's REST path)."""
        return await answer(request, request.app.state.manager.live(name), members)

    return app
