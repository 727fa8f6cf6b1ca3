"""TensorFlow Serving over gRPC: `tensorflow.serving.PredictionService` (Predict,
GetModelMetadata) and `ModelService` (GetModelStatus), carrying its codec
(service.protocols.tfs) to and from the data plane, as service.edge.rest carries its REST
predict. Errors, admission and metrics: service.rpc.calls; a client's deadline is the request's
queue deadline, as `X-Request-Timeout-Ms` is on HTTP.
"""

from __future__ import annotations

from service.dataplane.inference import DataPlane
from service.protocols import tfs
from service.protocols import tfs_messages as m
from service.rpc.calls import add, deadline, rpc


class PredictionService:
    """Predict and GetModelMetadata, on the data plane."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    @rpc(f"/{m.PREDICTION_SERVICE}/Predict", infers=True)
    async def Predict(self, request, context, hold):
        plane = self.plane
        ensemble = plane.ensemble(*tfs.model_of(request.model_spec))
        max_rows, when = plane.settings.max_rows_per_request, deadline(context, plane.settings.request_timeout_ms)
        if ensemble.manifest.format_version == 1:
            x = tfs.message_input(request, ensemble.input_spec, max_rows)
            names = tfs.wanted(request, ensemble)
            return tfs.predict_response(await plane.infer(ensemble, x, when), ensemble, names)
        x = tfs.message_named(request, ensemble.signature, max_rows)
        names = tfs.wanted(request, ensemble)
        return tfs.named_response(await plane.infer(ensemble, x, when, hold), ensemble, names)

    @rpc(f"/{m.PREDICTION_SERVICE}/GetModelMetadata")
    async def GetModelMetadata(self, request, context):
        ensemble = self.plane.ensemble(*tfs.model_of(request.model_spec))
        return tfs.metadata_response(ensemble, request.metadata_field)


class ModelService:
    """GetModelStatus: the versions of an ensemble, from what GET /models reports."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    @rpc(f"/{m.MODEL_SERVICE}/GetModelStatus")
    async def GetModelStatus(self, request, context):
        name = tfs.required_name(request.model_spec)
        # From the last poll's snapshot, as GET /models and the admin status route: no disk here.
        return tfs.status_response(self.plane.manager.named_status(name)["versions"], request.model_spec)


def add_to(server, plane: DataPlane) -> None:
    """Serve TensorFlow Serving's two services on a grpc.aio server."""
    predict, models = PredictionService(plane), ModelService(plane)
    add(server, m.PREDICTION_SERVICE, {
        "Predict": (predict.Predict, m.PredictRequest, m.PredictResponse),
        "GetModelMetadata": (predict.GetModelMetadata, m.GetModelMetadataRequest, m.GetModelMetadataResponse)})
    add(server, m.MODEL_SERVICE, {
        "GetModelStatus": (models.GetModelStatus, m.GetModelStatusRequest, m.GetModelStatusResponse)})
