"""The gRPC server of a service process: the Open Inference Protocol (service.rpc.v2),
TensorFlow Serving's PredictionService and ModelService (service.rpc.tfs),
`grpc.health.v1.Health` and server reflection, on grpc.aio in the event loop that serves HTTP,
sharing its manager, batcher, limits and metrics. Started and stopped by the app's lifespan when
`grpc_port` is set; it stops accepting once HTTP's requests are done, and gives its calls the same
grace.

A message is received whole by gRPC before a handler sees it: no message may be larger than the
largest valid request of the versions loaded (`GrpcService`, never more than max_body_bytes;
RESOURCE_EXHAUSTED from gRPC itself), at most max_grpc_calls calls are in the server at once,
and every call's message counts against the bytes in flight shared with HTTP
(service.rpc.calls).

Health: the empty service name is the default ensemble's readiness (as GET /readyz), an ensemble's
name its own, a protocol's service name the default's; anything else is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service.config import Settings
from service.dataplane.inference import DataPlane
from service.dataplane.limits import ENVELOPE_BYTES, largest_message
from service.errors import ModelNotFound, ServiceError
from service.protocols import oip, tfs_messages
from service.rpc import tfs, v2
from service.rpc.calls import add, rpc

log = logging.getLogger(__name__)
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Health:
    """Readiness computed at each Check from the manager (nothing to keep in step); Watch is
    not served (UNIMPLEMENTED), as the protocol allows."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    @rpc(f"/{HEALTH}/Check")
    async def Check(self, request, context):
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        if request.service in ("", *PROTOCOLS):
            ready = self.plane.manager.readiness()[0]
            return health_pb2.HealthCheckResponse(status=serving if ready else not_serving)
        try:
            self.plane.ensemble(request.service, None)
        except ServiceError:
            if request.service in self.plane.manager.slots:
                return health_pb2.HealthCheckResponse(status=not_serving)
            raise ModelNotFound(f"no ensemble named {request.service[:64]!r}") from None
        return health_pb2.HealthCheckResponse(status=serving)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every service's definitions in one pool for reflection: TensorFlow Serving's live in a
    pool of their own (service.protocols.tfs_messages), the others in protobuf's default pool."""
    pool = descriptor_pool.DescriptorPool()
    for file in tfs_messages.FILES.file:
        pool.Add(file)
    for module in (oip.messages(), health_pb2, reflection_pb2):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
    return pool


PROTOCOLS = (v2.SERVICE_NAME, tfs_messages.PREDICTION_SERVICE, tfs_messages.MODEL_SERVICE)
SERVICES = (*PROTOCOLS, HEALTH, reflection.SERVICE_NAME)


def message_limit(plane: DataPlane) -> int:
    """The largest message the gRPC server receives: the largest valid request of the versions
    loaded (service.dataplane.limits.largest_message; max_body_bytes for a format-2 version,
    whose strings and variable lengths have no largest), never more than max_body_bytes; with
    none loaded, only the envelope (inference is refused then anyway)."""
    return plane.largest_request(largest_message, ENVELOPE_BYTES)


class GrpcService:
    """The process's gRPC server, whose receive limit follows the versions loaded.

    gRPC receives a message whole before any handler sees it, and its limit is fixed when the
    server is built. So when a swap makes the limit grow (a version taking larger requests than
    any loaded since start; the first version of a server started with none), a new server is
    started on the same port (SO_REUSEPORT, gRPC's default on Linux) and the old one stopped
    with the shutdown grace: its calls finish, its clients are sent GOAWAY and reconnect to the
    new one; a call reaching the old one just as it stops may end CANCELLED or UNAVAILABLE, as
    at shutdown. Between the swap and the new server's start (milliseconds) a message past the
    old limit is still refused; a start that fails is tried again every poll interval. A limit
    that would shrink is left as it is: a hand-over costs more than the memory it would save."""

    def __init__(self, host: str, port: int, plane: DataPlane, settings: Settings):
        self.host, self.port, self.plane, self.settings = host, port, plane, settings
        self.server: grpc.aio.Server | None = None
        self.limit = 0
        self._generation = -1  # the manager's generation the limit was worked out for
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Listen with the limit of the versions loaded now, and follow them."""
        await self._open()
        self.plane.manager.on_swap.append(self._wake.set)
        self._task = asyncio.create_task(self._follow(), name="grpc-message-limit")

    async def _open(self) -> None:
        generation, limit = self.plane.manager.generation, message_limit(self.plane)
        old, self.server = self.server, await start(self.host, self.port, self.plane, self.settings, limit)
        self.limit, self._generation = limit, generation
        if old is not None:
            log.info("gRPC: messages of up to %d bytes from now on (the versions loaded changed)", limit)
            stopping = asyncio.create_task(old.stop(self.settings.shutdown_grace_seconds))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)

    async def _follow(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                if self.plane.manager.generation != self._generation:
                    if message_limit(self.plane) > self.limit:
                        await self._open()
                    else:
                        self._generation = self.plane.manager.generation
            except Exception:  # the server listening keeps serving; the next turn tries again
                log.exception("gRPC: opening a server with the new message limit failed")

    async def stop(self, grace: float) -> None:
        """No new calls; the running ones get `grace` seconds."""
        if self._wake.set in self.plane.manager.on_swap:
            self.plane.manager.on_swap.remove(self._wake.set)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace)
        await asyncio.gather(*self._stopping, return_exceptions=True)


async def start(host: str, port: int, plane: DataPlane, settings: Settings, limit: int) -> grpc.aio.Server:
    """A started gRPC server on host:port with both protocols, health and reflection, receiving
    messages of up to `limit` bytes."""
    server = grpc.aio.server(
        maximum_concurrent_rpcs=settings.max_grpc_calls,
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", -1)])
    v2.add_to(server, plane)
    tfs.add_to(server, plane)
    add(server, HEALTH, {"Check": (Health(plane).Check, health_pb2.HealthCheckRequest,
                                   health_pb2.HealthCheckResponse)})
    reflection.enable_server_reflection(SERVICES, server, pool=reflection_pool())
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"the gRPC server cannot listen on {host}:{port}")
    try:
        await server.start()
    except BaseException:  # cancelled or failed while starting: nothing left listening
        await server.stop(None)
        raise
    log.info("gRPC (Open Inference Protocol, TensorFlow Serving, health, reflection) on %s:%d", host, bound)
    return server
