"""The gRPC server of a service process: the Open Inference Protocol (service.rpc.v2),
TensorFlow Serving's PredictionService and ModelService (service.rpc.tfs),
`grpc.health.v1.Health` and server reflection, on grpc.aio in the event loop that serves HTTP,
sharing its manager, batcher, limits and metrics. Started and stopped by the app's lifespan when
`grpc_port` is set; it stops accepting once HTTP's requests are done, and gives its calls the same
grace.

A message is received whole by gRPC before a handler sees it: no message may be larger than
max_body_bytes (RESOURCE_EXHAUSTED from gRPC itself), at most max_grpc_calls calls are in the
server at once, and an inference call's message counts against the bytes in flight shared with
HTTP (service.rpc.calls).

Health: the empty service name is the default ensemble's readiness (as GET /readyz), an ensemble's
name its own, a protocol's service name the default's; anything else is NOT_FOUND.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service.config import Settings
from service.edge.inference import Inference
from service.errors import ModelNotFound, ServiceError
from service.rpc import tfs, tfs_messages, v2
from service.rpc.calls import add, rpc

log = logging.getLogger(__name__)
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Health:
    """Readiness computed at each Check from the manager (nothing to keep in step); Watch is
    not served (UNIMPLEMENTED), as the protocol allows."""

    def __init__(self, inference: Inference):
        self.inference = inference

    @rpc(f"/{HEALTH}/Check")
    async def Check(self, request, context):
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        if request.service in ("", *PROTOCOLS):
            ready = self.inference.state.manager.readiness()[0]
            return health_pb2.HealthCheckResponse(status=serving if ready else not_serving)
        try:
            self.inference.ensemble(request.service, None)
        except ServiceError:
            if request.service in self.inference.state.manager.slots:
                return health_pb2.HealthCheckResponse(status=not_serving)
            raise ModelNotFound(f"no ensemble named {request.service[:64]!r}") from None
        return health_pb2.HealthCheckResponse(status=serving)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every service's definitions in one pool for reflection: TensorFlow Serving's live in a
    pool of their own (service.rpc.tfs_messages), the others in protobuf's default pool."""
    pool = descriptor_pool.DescriptorPool()
    for file in tfs_messages.FILES.file:
        pool.Add(file)
    for module in (v2.pb, health_pb2, reflection_pb2):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
    return pool


PROTOCOLS = (v2.SERVICE_NAME, tfs_messages.PREDICTION_SERVICE, tfs_messages.MODEL_SERVICE)
SERVICES = (*PROTOCOLS, HEALTH, reflection.SERVICE_NAME)


async def start(host: str, port: int, inference: Inference, settings: Settings) -> grpc.aio.Server:
    """A started gRPC server on host:port with both protocols, health and reflection."""
    server = grpc.aio.server(
        maximum_concurrent_rpcs=settings.max_grpc_calls,
        options=[("grpc.max_receive_message_length", settings.max_body_bytes),
                 ("grpc.max_send_message_length", -1)])
    v2.add_to(server, inference)
    tfs.add_to(server, inference)
    add(server, HEALTH, {"Check": (Health(inference).Check, health_pb2.HealthCheckRequest,
                                   health_pb2.HealthCheckResponse)})
    reflection.enable_server_reflection(SERVICES, server, pool=reflection_pool())
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"the gRPC server cannot listen on {host}:{port}")
    await server.start()
    log.info("gRPC (Open Inference Protocol, TensorFlow Serving, health, reflection) on %s:%d", host, bound)
    return server
