"""The gRPC server of a service process: the Open Inference Protocol (service.rpc.v2),
`grpc.health.v1.Health` and server reflection, on grpc.aio in the event loop that serves HTTP,
sharing its manager, batcher and limits. Started and stopped by the app's lifespan when
`grpc_port` is set; it stops accepting when HTTP does and gives its requests the same grace.

Health: the empty service name is the default ensemble's readiness (as GET /readyz), an ensemble's
name its own, the protocol's service name the default's; anything else is NOT_FOUND.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.edge.inference import Inference
from service.errors import ServiceError
from service.rpc import v2

log = logging.getLogger(__name__)


class Health(health_pb2_grpc.HealthServicer):
    """Readiness computed at each Check from the manager (nothing to keep in step)."""

    def __init__(self, inference: Inference):
        self.inference = inference

    async def Check(self, request, context):
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        if request.service in ("", v2.SERVICE_NAME):
            ready = self.inference.state.manager.readiness()[0]
            return health_pb2.HealthCheckResponse(status=serving if ready else not_serving)
        try:
            self.inference.ensemble(request.service, None)
        except ServiceError:
            if request.service in self.inference.state.manager.slots:
                return health_pb2.HealthCheckResponse(status=not_serving)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no ensemble named {request.service[:64]!r}")
        return health_pb2.HealthCheckResponse(status=serving)


async def start(host: str, port: int, inference: Inference) -> grpc.aio.Server:
    """A started gRPC server on host:port with the protocol, health and reflection."""
    server = grpc.aio.server()
    v2.add_to(server, inference)
    health_pb2_grpc.add_HealthServicer_to_server(Health(inference), server)
    reflection.enable_server_reflection(
        (v2.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"the gRPC server cannot listen on {host}:{port}")
    await server.start()
    log.info("gRPC (Open Inference Protocol, health, reflection) on %s:%d", host, bound)
    return server
