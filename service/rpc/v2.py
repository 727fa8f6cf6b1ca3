"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`): the same ensembles,
batcher, limits and errors as the HTTP route (service.edge.v2), with typed `contents` or
`raw_input_contents` / `raw_output_contents`.

An answer's outputs are raw bytes when the request sent its input raw or asks for any output
with the `binary_data` parameter (the protocol has raw contents for every output or for none),
else typed contents. Errors, admission and metrics: service.rpc.calls; a client's deadline is
the request's queue deadline, as `X-Request-Timeout-Ms` is on HTTP.
"""

from __future__ import annotations

import numpy as np

from service.edge.inference import Inference
from service.edge.v2 import DATATYPES, OUTPUTS, check_input, datatype, model_metadata, output
from service.edge.arrays import to_spec
from service.errors import InvalidInput, ModelNotFound, ServiceError
from service.rpc.calls import add, deadline, rpc
from service.rpc.gen import grpc_predict_v2_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Datatype -> the InferTensorContents field holding its values (the benchmark's load generator uses it too).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}
# The input datatypes a request may use: the HTTP route's that have a contents field.
_TYPED = {name: numpy for name, numpy in DATATYPES.items() if name in CONTENTS}


def input_array(request: pb.ModelInferRequest, spec, max_rows: int) -> np.ndarray:
    """The request's one input tensor as rows of the model's input spec; InvalidInput (or
    PayloadTooLarge) naming what is wrong."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"'inputs' holds {len(request.inputs)} tensors; this model takes exactly one")
    tensor = request.inputs[0]
    shape, name = list(tensor.shape), tensor.datatype
    dtype, count = check_input(shape, name, spec, max_rows, _TYPED)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(f"raw_input_contents holds {len(request.raw_input_contents)} tensors; one input was sent")
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(f"raw_input_contents[0] has {len(raw)} bytes; shape {shape} of {name} needs "
                               f"{count * dtype.itemsize}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        values = getattr(tensor.contents, CONTENTS[name])
        if len(values) != count:
            raise InvalidInput(f"inputs[0].contents holds {len(values)} values in {CONTENTS[name]}; shape {shape} "
                               f"of {name} needs {count}")
        array = np.asarray(values, dtype=dtype).reshape(shape)
    return to_spec(array, spec, "inputs[0]")


def wanted(request: pb.ModelInferRequest) -> list[tuple[str, bool]]:
    """(output name, as raw bytes) of each output asked for; `probabilities` when none is."""
    raw = bool(request.raw_input_contents)
    if not request.outputs:
        return [("probabilities", raw)]
    names = []
    for o in request.outputs:
        if o.name not in OUTPUTS:
            raise InvalidInput(f"unknown output {o.name[:100]!r}; this model has {', '.join(OUTPUTS)}")
        binary = o.parameters["binary_data"].bool_param if "binary_data" in o.parameters else False
        names.append((o.name, raw or binary))
    return names


def version_of(text: str) -> str | None:
    """A request's model version: None when empty (the live one), else its digits; NOT_FOUND
    for anything else (HTTP routes only match digits)."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ModelNotFound(f"version {text[:20]!r} is not a version number")
    return text


class InferenceService:
    """The six RPCs, on the service's manager and batcher (through `Inference`)."""

    def __init__(self, inference: Inference):
        self.inference = inference

    @property
    def manager(self):
        return self.inference.state.manager

    @rpc(f"/{SERVICE_NAME}/ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc(f"/{SERVICE_NAME}/ServerReady")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.manager.readiness()[0])

    @rpc(f"/{SERVICE_NAME}/ModelReady")
    async def ModelReady(self, request, context):
        try:
            self.inference.ensemble(request.name, version_of(request.version))
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc(f"/{SERVICE_NAME}/ServerMetadata")
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="ensemble-serving", version="0.1.0", extensions=[])

    @rpc(f"/{SERVICE_NAME}/ModelMetadata")
    async def ModelMetadata(self, request, context):
        meta = model_metadata(self.inference.ensemble(request.name, version_of(request.version)))
        tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    @rpc(f"/{SERVICE_NAME}/ModelInfer", infers=True)
    async def ModelInfer(self, request, context):
        ensemble = self.inference.ensemble(request.model_name, version_of(request.model_version))
        x = input_array(request, ensemble.input_spec, self.inference.settings.max_rows_per_request)
        outputs = wanted(request)
        by = deadline(context, self.inference.settings.request_timeout_ms)
        average, members, scores = await self.inference.infer_by(by, ensemble, x)
        reply = pb.ModelInferResponse(model_name=ensemble.name, model_version=str(ensemble.version), id=request.id)
        raw_all = any(raw for _, raw in outputs)  # the protocol: raw for every output or for none
        for name, _ in outputs:
            array = np.ascontiguousarray(output(name, ensemble, average, members, scores))
            name_of_type = datatype(array.dtype.name)
            tensor = reply.outputs.add(name=name, datatype=name_of_type, shape=list(array.shape))
            if raw_all:
                reply.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
            else:
                getattr(tensor.contents, CONTENTS[name_of_type]).extend(array.reshape(-1).tolist())
        return reply

def add_to(server, inference: Inference) -> None:
    """Serve the Open Inference Protocol on a grpc.aio server: every RPC of the service."""
    servicer = InferenceService(inference)
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    add(server, SERVICE_NAME, {method.name: (getattr(servicer, method.name),
                                             getattr(pb, method.input_type.name), getattr(pb, method.output_type.name))
                               for method in methods})
