"""The Open Inference Protocol (KServe V2), its codec for both of its encodings: the JSON body
(with binary tensors after a JSON header, the binary tensor extension) and the protobuf
messages of `inference.GRPCInferenceService`. It knows nothing of HTTP or gRPC: service.edge.v2
and service.rpc.v2 carry it.

One input tensor (`instances`, the manifest's shape with a batch dimension first); outputs
`probabilities` (rows, classes, the default), `members` (rows, members, classes), the
uncertainty scores `entropy`, `expected_entropy` and `mutual_information` (rows, FP32,
contract.scores), and `abstain` (rows, BOOL; for versions with an abstention threshold). In
JSON each output is `data` or raw little-endian bytes as the request asks; in a message, raw
bytes for every output when the request sent its input raw or asks for any output with the
`binary_data` parameter (the protocol has raw contents for every output or for none), else typed
contents.
"""

from __future__ import annotations

import math
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from contract.manifest import InputSpec
from service.answer import Answer
from service.errors import InvalidInput, MalformedRequest, ModelNotFound, PayloadTooLarge
from service.protocols.arrays import encode, narrowed, numeric, parse_json_object, to_spec
from contract.scores import SCORES

if TYPE_CHECKING:
    from service.protocols.gen import grpc_predict_v2_pb2 as pb
DATATYPES = {"FP32": "float32", "FP64": "float64", "INT32": "int32", "INT64": "int64",
             "UINT8": "uint8", "INT16": "int16", "INT8": "int8", "UINT16": "uint16", "FP16": "float16"}
_NAMES = {**{v: k for k, v in DATATYPES.items()}, "bool": "BOOL"}
OUTPUTS = ("probabilities", "members", *SCORES, "abstain")
# Datatype -> the InferTensorContents field holding its values (the benchmark's load generator uses it too).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}
# The type each contents field's values arrive in, before the check against the tensor's datatype.
_WIDE = {"bool_contents": "bool", "int_contents": "int64", "int64_contents": "int64", "uint_contents": "uint64",
         "uint64_contents": "uint64", "fp32_contents": "float32", "fp64_contents": "float64"}
# The input datatypes a message may use: the JSON body's that have a contents field.
_TYPED = {name: numpy for name, numpy in DATATYPES.items() if name in CONTENTS}


# -- JSON ---------------------------------------------------------------------------------------

def datatype(dtype: str) -> str:
    """The protocol's name of a numpy dtype name ("float32" -> "FP32")."""
    return _NAMES[dtype]


# -- decode -----------------------------------------------------------------------------------

def parameters(holder: dict[str, Any], where: str) -> dict[str, Any]:
    """The `parameters` object of a request, an input or an output ({} when absent)."""
    value = holder.get("parameters")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}parameters must be a JSON object, got a JSON {type(value).__name__}")
    return value


def split_binary_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a V2 body, using Inference-Header-Content-Length if present."""
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()):
        raise MalformedRequest(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
    if len(header_length) > len(str(len(body))):  # more digits than the body's length has
        raise MalformedRequest(
            f"Inference-Header-Content-Length is {header_length[:20]}... but the body has only {len(body)} bytes")
    n = int(header_length)
    if n > len(body):
        raise MalformedRequest(
            f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes")
    return body[:n], body[n:]


def check_input(shape: list[int], dtype_name: object, spec: InputSpec, max_rows: int,
                datatypes: dict[str, str], where: str = "inputs[0]") -> tuple[np.dtype, int]:
    """(little-endian dtype, number of values) of the one input tensor (`where` in messages),
    after checking its datatype (one of `datatypes`), its shape against the model's and its
    rows against the limit; InvalidInput or PayloadTooLarge naming the problem. Shared by both
    encodings and by TensorFlow Serving's (service.protocols.tfs)."""
    if not isinstance(dtype_name, str) or dtype_name not in datatypes:
        raise InvalidInput(f"{where}.datatype {str(dtype_name)[:40]!r} is not one of {', '.join(datatypes)}")
    expected = list(spec.shape)
    if len(shape) != len(expected) + 1 or shape[1:] != expected or shape[0] < 0:
        raise InvalidInput(f"{where}.shape must be [rows, {', '.join(map(str, expected))}], got {shape[:10]}")
    rows = shape[0]
    if rows == 0:
        raise InvalidInput(f"{where} has 0 rows: send at least one")
    if rows > max_rows:
        raise PayloadTooLarge(f"{where} has {rows} rows; at most {max_rows} are allowed per request")
    return np.dtype(datatypes[dtype_name]).newbyteorder("<"), math.prod(shape)


def input_array(payload: dict[str, Any], binary: bytes, spec: InputSpec, max_rows: int) -> np.ndarray:
    """The single input tensor of a V2 inference request, from JSON `data` or the binary part."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("missing field 'inputs': send [{\"name\", \"shape\", \"datatype\", \"data\"}]")
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"'inputs' holds {len(inputs)} tensors; this model takes exactly one")
    tensor = inputs[0]
    shape, dtype_name = tensor.get("shape"), tensor.get("datatype")
    # type(d) is int: JSON true and false are Python bools, which isinstance(d, int) accepts
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput("inputs[0].shape must be a list of non-negative integers")
    dtype, count = check_input(shape, dtype_name, spec, max_rows, DATATYPES)
    size = parameters(tensor, "inputs[0].").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count * dtype.itemsize:
            raise InvalidInput(
                f"inputs[0] declares binary_data_size {size} but shape {shape} of {dtype_name} needs "
                f"{count * dtype.itemsize} bytes")
        if len(binary) != size:
            raise InvalidInput(f"the binary part of the body has {len(binary)} bytes; inputs[0] declares {size}")
        array = np.frombuffer(binary, dtype=dtype).reshape(shape)
    else:
        if "data" not in tensor:
            raise InvalidInput("inputs[0] has neither 'data' nor parameters.binary_data_size")
        array = numeric(tensor["data"], "inputs[0].data")
        if array.size != count:
            raise InvalidInput(f"inputs[0].data holds {array.size} values; shape {shape} needs {count}")
        array = array.reshape(shape)
    return to_spec(array, spec, "inputs[0]")


def wanted_outputs(payload: dict[str, Any]) -> tuple[list[str], set[str]]:
    """(outputs to return, those to return as binary) from a V2 request's `outputs`/`parameters`."""
    all_binary = parameters(payload, "").get("binary_data_output", False) is True
    requested = payload.get("outputs")
    if requested is None:
        return ["probabilities"], ({"probabilities"} if all_binary else set())
    if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        raise InvalidInput("'outputs' must be a list of {\"name\": \"...\"}")
    names, binary = [], set()
    for i, output in enumerate(requested):
        if output["name"] not in OUTPUTS:
            raise InvalidInput(f"unknown output {output['name'][:100]!r}; this model has {', '.join(OUTPUTS)}")
        names.append(output["name"])
        if all_binary or parameters(output, f"outputs[{i}].").get("binary_data") is True:
            binary.add(output["name"])
    return names, binary


def decode(body: bytes, header_length: str | None, spec: InputSpec, max_rows: int,
           max_values: int) -> tuple[dict[str, Any], np.ndarray, list[str], set[str]]:
    """(payload, input rows, outputs wanted, those wanted as binary) of an infer request."""
    head, binary = split_binary_body(body, header_length)
    payload = parse_json_object(head, max_values)
    x = input_array(payload, binary, spec, max_rows)
    wanted, binary_outputs = wanted_outputs(payload)
    return payload, x, wanted, binary_outputs


# -- encode -----------------------------------------------------------------------------------

def encode_outputs(model: str, version: int, request_id: Any, tensors: dict[str, np.ndarray],
                   binary: set[str]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): JSON outputs inline, binary ones appended raw."""
    outputs, raw = [], []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype(array.dtype.name)}
        if name in binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            raw.append(blob)
        else:
            entry["data"] = array.reshape(-1)
        outputs.append(entry)
    header = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if request_id is not None:
        header["id"] = request_id
    head = encode(header)
    if not raw:
        return head, None
    return head + b"".join(raw), len(head)


def output(name: str, answer: Answer) -> np.ndarray:
    """The output tensor called `name` (one of OUTPUTS) of an answer's rows."""
    head = answer.head
    if name == "probabilities":
        return head.combined
    if name == "members":
        return head.members
    if name == "abstain":
        abstain = head.abstain()
        if abstain is None:
            raise InvalidInput(f"{answer.name} version {answer.version} has no abstention threshold "
                               "(its manifest has none); ask for the uncertainty scores instead")
        return abstain
    return head.score(name)


def named_metadata(ensemble) -> dict[str, Any]:
    """A format-2 version's metadata: every named input (strings as BYTES, a variable dimension
    as -1) and every head with its task and labels (inference through this protocol comes later)."""
    names = {**_NAMES, "string": "BYTES"}
    signature = ensemble.signature
    return {
        "name": ensemble.name,
        "versions": [str(ensemble.version)],
        "platform": "tensorflow_savedmodel_ensemble",
        "inputs": [{"name": spec.name, "datatype": names[spec.dtype],
                    "shape": [-1, *(-1 if d is None else d for d in spec.shape)]} for spec in signature.inputs],
        "outputs": [{"name": head.name, "datatype": "FP32", "shape": [-1, head.columns]} for head in signature.heads],
        "parameters": {"heads": {head.name: {"task": head.task, "labels": list(head.labels)}
                                 for head in signature.heads},
                       "members": list(ensemble.member_names)},
    }


def model_metadata(ensemble) -> dict[str, Any]:
    """GET /v2/models/{name}: the input, the outputs, the classes and the members."""
    if ensemble.manifest.format_version != 1:
        return named_metadata(ensemble)
    spec, classes, members = ensemble.input_spec, ensemble.classes, ensemble.manifest.members
    return {
        "name": ensemble.name,
        "versions": [str(ensemble.version)],
        "platform": "tensorflow_savedmodel_ensemble",
        "inputs": [{"name": "instances", "datatype": datatype(spec.dtype), "shape": [-1, *spec.shape]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]},
            {"name": "members", "datatype": "FP32", "shape": [-1, len(members), len(classes)]},
            *({"name": score, "datatype": "FP32", "shape": [-1]} for score in SCORES),
            *([{"name": "abstain", "datatype": "BOOL", "shape": [-1]}]
              if ensemble.manifest.abstention is not None else []),
        ],
        "parameters": {"classes": list(classes), "members": [m.name for m in members],
                       "temperature": ensemble.manifest.temperature,
                       **({"abstention": ensemble.manifest.abstention.model_dump()}
                          if ensemble.manifest.abstention is not None else {})},
    }


# -- messages -----------------------------------------------------------------------------------

@cache
def messages() -> ModuleType:
    """The protocol's generated messages, imported on first use: they register the `inference`
    package in protobuf's default pool, where another copy (tritonclient's, in a client process
    that also imports this) would clash, so a process that serves no gRPC never loads them."""
    from service.protocols.gen import grpc_predict_v2_pb2

    return grpc_predict_v2_pb2


def message_input(request: pb.ModelInferRequest, spec, max_rows: int) -> np.ndarray:
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
        # contents fields are 32 or 64 bits wide: a narrower datatype's values are range-checked
        array = narrowed(np.asarray(values, dtype=_WIDE[CONTENTS[name]]), dtype, "inputs[0].contents").reshape(shape)
    return to_spec(array, spec, "inputs[0]")


def message_outputs(request: pb.ModelInferRequest) -> list[tuple[str, bool]]:
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


def infer_response(answer: Answer, request_id: str, outputs: list[tuple[str, bool]]) -> pb.ModelInferResponse:
    """The ModelInferResponse of an answer: the outputs asked for (`message_outputs`), all raw
    bytes if any is asked raw, else typed contents."""
    pb = messages()
    reply = pb.ModelInferResponse(model_name=answer.name, model_version=str(answer.version), id=request_id)
    raw_all = any(raw for _, raw in outputs)  # the protocol: raw for every output or for none
    for name, _ in outputs:
        array = np.ascontiguousarray(output(name, answer))
        name_of_type = datatype(array.dtype.name)
        tensor = reply.outputs.add(name=name, datatype=name_of_type, shape=list(array.shape))
        if raw_all:
            reply.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
        else:
            getattr(tensor.contents, CONTENTS[name_of_type]).extend(array.reshape(-1).tolist())
    return reply


def metadata_response(ensemble) -> pb.ModelMetadataResponse:
    """GET /v2/models/{name} as a ModelMetadataResponse."""
    meta, pb = model_metadata(ensemble), messages()
    tensors = [[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[side]] for side in ("inputs", "outputs")]
    return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                    inputs=tensors[0], outputs=tensors[1])
