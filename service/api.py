"""The application: lifespan (manager and batcher), error mapping, and the routes that are not
inference: health, readiness, models, metrics, Open Inference Protocol health and metadata.

The inference routes themselves (`/predict`, TensorFlow Serving's `:predict`, the Open
Inference Protocol's `/infer`) are the pure ASGI layer of `service.inference_routes`, which
`create_app` puts in front of FastAPI. No TensorFlow here.
"""

from __future__ import annotations

import functools
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
from service.manager import Loader, ModelManager, PinStore, tune_garbage_collector
from service.metrics import CONTENT_TYPE, ServiceMetrics
from service.servable import LoadError

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


def default_loader(settings: Settings) -> Loader:
    """The real loader: the version is compiled into one frozen graph and its TensorFlow Lite
    model (in a child process with isolated_loading; from the cache when it was compiled
    before), and the server loads and warms up the engine of settings.engine: TensorFlow Lite
    when the version has a model for it, else TensorFlow. TensorFlow is imported only for a
    version that runs on it (or is compiled in this process): a server whose versions all run
    on TensorFlow Lite never imports it."""
    folder = settings.compile_cache_dir or (settings.state_dir / "compiled" if settings.state_dir else None)
    batch_threads, intra, inter = thread_plan(settings.inference_threads, settings.intra_op_threads,
                                              settings.inter_op_threads, settings.workers, os.cpu_count() or 1)

    def load(manifest, path, pace):
        from service.compiled import GraphCache
        from service.compiler import stops

        began = stops()  # the server stopping after this (compiler.stop_all) abandons the load

        def compile_it():
            if settings.isolated_loading:
                from service.compiler import compile_in_child
                from service.manager import LOADER_NICENESS

                return compile_in_child(path, settings.load_timeout_seconds, LOADER_NICENESS, began)
            configure_tensorflow(intra, inter)
            from service.frozen import compile_version

            return compile_version(manifest, path, pace)

        if folder is None:
            graph = compile_it()
        else:  # workers share the folder: one compiles a new version, the others wait and read it
            graph = GraphCache(folder).get_or_compile(path, compile_it, settings.load_timeout_seconds,
                                                      give_up=lambda: stops() != began)
        if settings.engine == "tflite" and graph.lite is not None:
            from service.lite import load_lite

            try:
                return load_lite(manifest, path, graph.lite, settings.warmup_batch_sizes, pace,
                                 threads=intra, pool=batch_threads)
            except LoadError as exc:  # the frozen graph was checked on its own: it can still serve
                log.warning("%s version %d runs on TensorFlow: its TensorFlow Lite model failed: %s",
                            manifest.name, manifest.version, exc)
        configure_tensorflow(intra, inter)
        from service.frozen import import_frozen

        return import_frozen(manifest, path, graph, settings.warmup_batch_sizes, pace)

    return load


def thread_plan(batch_threads: int, intra: int, inter: int, workers: int, cores: int) -> tuple[int, int, int]:
    """(inference threads, TensorFlow intra-op threads, inter-op threads); 0 means automatic.

    Automatic: one batch computes at a time, on all of the worker's cores, with one inter-op
    thread. With TensorFlow Lite and one-row requests the model is not what limits a process:
    its event loop is, and every batch needs the interpreter lock twice in its thread (to take
    the batch, to hand back the outputs), so a second inference thread only adds waits for the
    lock. Measured on 2 cores, `wrk -c32` 8 s, 3 interleaved rounds: one thread of two XNNPACK
    threads with the 1 ms switch interval (`switch_interval_ms`) 3,189-3,266 req/s, p99
    15.0-16.5 ms; two single-threaded, 2 ms: 2,488-2,688 req/s, p99 20.0-20.9 ms; two
    single-threaded, Python's 5 ms (the previous default): 2,421-2,861 req/s, p99 14.8-18.5 ms.
    256-row requests at 4 connections ran at the same rate either way. README, Speed, has the
    table."""
    share = max(1, cores // workers)
    batch_threads = batch_threads or 1
    return batch_threads, intra or max(1, share // batch_threads), inter or batch_threads


@functools.lru_cache(maxsize=None)
def configure_tensorflow(intra: int, inter: int) -> None:
    """Import TensorFlow and size its thread pools, once: before it runs its first op, and only
    when a version needs it."""
    import tensorflow as tf

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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batch_threads, _, _ = thread_plan(settings.inference_threads, settings.intra_op_threads,
                                          settings.inter_op_threads, settings.workers, os.cpu_count() or 1)
        tune_garbage_collector()
        switch_interval = sys.getswitchinterval()
        if settings.switch_interval_ms:
            sys.setswitchinterval(settings.switch_interval_ms / 1000)
        manager = ModelManager(settings.repository, loader or default_loader(settings), metrics,
                               settings.version_policy, settings.poll_interval_seconds,
                               settings.default_model, PinStore(settings.state_dir),
                               settings.loader_duty_cycle)
        batcher = Batcher(settings.max_batch_size, settings.max_batch_delay_ms / 1000,
                          settings.max_queue_rows, on_batch=metrics.observe_batch,
                          on_depth=metrics.queue_depth.set, threads=batch_threads)
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
            from service.compiler import stop_all

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
