"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), carrying its
codec (service.protocols.oip, the messages' half) to and from the data plane, as service.edge.v2
carries the JSON half. Errors, admission and metrics: service.rpc.calls; a client's deadline is
the request's queue deadline, as `X-Request-Timeout-Ms` is on HTTP.
"""

from __future__ import annotations

from service.dataplane.inference import DataPlane
from service.errors import ServiceError
from service.protocols import named, oip
from service.rpc.calls import add, deadline, rpc

pb = oip.messages()
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceService:
    """The six RPCs, on the data plane."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    @rpc(f"/{SERVICE_NAME}/ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc(f"/{SERVICE_NAME}/ServerReady")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.manager.readiness()[0])

    @rpc(f"/{SERVICE_NAME}/ModelReady")
    async def ModelReady(self, request, context):
        try:
            self.plane.ensemble(request.name, oip.version_of(request.version))
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc(f"/{SERVICE_NAME}/ServerMetadata")
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="ensemble-serving", version="0.1.0", extensions=[])

    @rpc(f"/{SERVICE_NAME}/ModelMetadata")
    async def ModelMetadata(self, request, context):
        return oip.metadata_response(self.plane.ensemble(request.name, oip.version_of(request.version)))

    @rpc(f"/{SERVICE_NAME}/ModelInfer", infers=True)
    async def ModelInfer(self, request, context, hold):
        plane = self.plane
        ensemble = plane.ensemble(request.model_name, oip.version_of(request.model_version))
        max_rows, when = plane.settings.max_rows_per_request, deadline(context, plane.settings.request_timeout_ms)
        if ensemble.manifest.format_version == 1:
            x = oip.message_input(request, ensemble.input_spec, max_rows)
            outputs = oip.message_outputs(request)
            return oip.infer_response(await plane.infer(ensemble, x, when), request.id, outputs)
        signature = ensemble.signature
        x = oip.message_named(request, signature, max_rows)
        outputs = oip.message_outputs(request, named.outputs_of(signature), tuple(h.name for h in signature.heads))
        level = oip.message_level(request)
        answer = await plane.infer(ensemble, x, when, hold)
        return oip.named_response(answer, request.id, outputs, signature, level)


def add_to(server, plane: DataPlane) -> None:
    """Serve the Open Inference Protocol on a grpc.aio server: every RPC of the service."""
    servicer = InferenceService(plane)
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    add(server, SERVICE_NAME, {method.name: (getattr(servicer, method.name),
                                             getattr(pb, method.input_type.name), getattr(pb, method.output_type.name))
                               for method in methods})
