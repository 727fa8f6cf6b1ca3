"""The application: settings, metrics, the manager with its loader, the batcher and the routes,
wired together. Nothing else happens here; each part is a module of its own.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.batching import Batcher
from service.config import Settings
from service.edge import reports, routes, v2
from service.edge.fast_http import path_in_use
from service.dataplane.inference import DataPlane
from service.dataplane.limits import InflightBytes
from service.edge.asgi import Edge
from service.edge.replies import install_error_replies
from service.engines.child import stop_all
from service.engines.loader import EngineLoader, plan_of
from service.lifecycle.manager import Loader, ModelManager
from service.lifecycle.memory import tune_garbage_collector
from service.lifecycle.pins import PinStore, pins_folder
from service.metrics import ServiceMetrics
from service.runtime import Runtime

log = logging.getLogger(__name__)


def pins_of(settings: Settings) -> PinStore:
    """Where the replicas' pins live: the state folder when one is given, else beside the
    ensembles: `<repository>/.state`, or the store's `.state/pins.json` object."""
    if settings.store is not None and settings.state_dir is None:
        from contract.store import RemoteStore

        return PinStore(remote=RemoteStore(settings.store))
    return PinStore(pins_folder(settings.repository, settings.state_dir))


def mirror_of(settings: Settings, pins: PinStore):
    """For an object-store repository, what brings its versions into the local folder the
    manager reads (contract.remote.Mirror.sync: the pinned version, then newest first, two a
    poll per ensemble, so a server is ready once what it serves is in); None for a folder."""
    if settings.store is None:
        return None
    from contract.remote import Mirror
    from contract.store import RemoteStore

    policy = settings.version_policy if isinstance(settings.version_policy, int) else None
    return Mirror(RemoteStore(settings.store), settings.repository, per_sync=2,
                  first=lambda name: pins.get(name) or policy).sync


def create_app(
    settings: Settings | None = None,
    metrics: ServiceMetrics | None = None,
    loader: Loader | None = None,
) -> Edge:
    """The ASGI application (the inference layer in front of FastAPI); pass settings, a metrics
    object and a loader to replace the defaults. `.app` is the FastAPI application, `.plane`
    the data plane and `.plane.runtime` what they share."""
    settings = settings or Settings()
    metrics = metrics or ServiceMetrics()
    threads = plan_of(settings, os.cpu_count() or 1)
    pins = pins_of(settings)
    runtime = Runtime(
        settings, metrics,
        ModelManager(settings.repository, loader or EngineLoader(settings, threads), metrics,
                     settings.version_policy, settings.poll_interval_seconds, settings.default_model,
                     pins, settings.loader_duty_cycle, sync=mirror_of(settings, pins)),
        Batcher(settings.max_batch_size, settings.max_batch_delay_ms / 1000, settings.max_queue_rows,
                on_batch=metrics.observe_batch, on_depth=metrics.queue_depth.set,
                threads=threads.inference_threads),
        InflightBytes(settings.max_inflight_bytes, per_peer=settings.max_inflight_bytes_per_peer),
        path_in_use(settings))
    plane = DataPlane(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tune_garbage_collector()
        switch_interval = sys.getswitchinterval()
        if settings.switch_interval_ms:
            sys.setswitchinterval(settings.switch_interval_ms / 1000)
        manager, batcher = runtime.manager, runtime.batcher
        batcher.start()
        await manager.start()
        grpc_server = None
        try:
            if settings.grpc_port:  # imported only then: its server and services load with it
                from service.rpc import server as rpc

                grpc_server = rpc.GrpcService(settings.host, settings.grpc_port, plane, settings)
                await grpc_server.start()
            yield
        finally:
            if grpc_server is not None:  # as HTTP: no new calls, the running ones get the grace
                await grpc_server.stop(settings.shutdown_grace_seconds)
            # uvicorn has stopped accepting and waited for the requests it had; whatever is
            # still queued gets the rest of the grace period before it is failed.
            if not await batcher.drain(settings.shutdown_grace_seconds):
                log.warning("shutdown: the queue did not drain in %.0f s", settings.shutdown_grace_seconds)
            await manager.stop()
            stop_all()  # a version still compiling, or waiting for another worker's compile, is not needed
            await batcher.stop()
            sys.setswitchinterval(switch_interval)

    # /docs comes from service.edge.reports, on local assets: FastAPI's own loads them from a CDN.
    app = FastAPI(title="ensemble-serving", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    metrics.http_fast_path.set(1 if runtime.http_path == "fast" else 0)
    install_error_replies(app)
    routes.register(app, runtime)
    v2.register(app, runtime)
    reports.register(app, settings.repository)
    Edge.document(app)
    return Edge(app, plane)
