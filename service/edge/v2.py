"""The Open Inference Protocol (KServe V2) over HTTP: decode, encode, schema, health and metadata.

    POST /v2/models/{name}[/versions/{v}]/infer        JSON, or binary tensors after a JSON
                                                        header (Inference-Header-Content-Length)
    GET  /v2, /v2/health/live, /v2/health/ready         server metadata and health
    GET  /v2/models/{name}[/versions/{v}][/ready]       model metadata and readiness

One input tensor (`instances`, the manifest's shape with a batch dimension first); outputs
`probabilities` (rows, classes, the default), `members` (rows, members, classes), the
uncertainty scores `entropy`, `expected_entropy` and `mutual_information` (rows, FP32,
contract.scores), and `abstain` (rows, BOOL; for versions with an abstention threshold), each
returned as JSON `data` or as raw little-endian bytes (the binary tensor extension) as the
request asks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from service.edge.arrays import numeric, parse_json_object, to_spec
from service.edge.replies import Reply, as_response, encode, json_reply
from service.engines.base import SCORE_COLUMNS
from service.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from contract.manifest import InputSpec
from contract.scores import SCORES

if TYPE_CHECKING:
    from service.edge.inference import Call, Inference

DATATYPES = {"FP32": "float32", "FP64": "float64", "INT32": "int32", "INT64": "int64",
             "UINT8": "uint8", "INT16": "int16", "INT8": "int8", "UINT16": "uint16", "FP16": "float16"}
_NAMES = {**{v: k for k, v in DATATYPES.items()}, "bool": "BOOL"}
OUTPUTS = ("probabilities", "members", *SCORES, "abstain")
ABSTAIN = SCORE_COLUMNS.index("abstain")


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
    rows against the limit; InvalidInput or PayloadTooLarge naming the problem. Shared with
    service.rpc.v2 and service.rpc.tfs."""
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


def output(name: str, ensemble, average: np.ndarray, members: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The output tensor called `name` (one of OUTPUTS) of a request's rows."""
    if name == "probabilities":
        return average
    if name == "members":
        return members
    if name == "abstain":
        if ensemble.manifest.abstention is None:
            raise InvalidInput(f"{ensemble.name} version {ensemble.version} has no abstention threshold "
                               "(its manifest has none); ask for the uncertainty scores instead")
        return scores[:, ABSTAIN] > 0
    return np.ascontiguousarray(scores[:, SCORES.index(name)])


def model_metadata(ensemble) -> dict[str, Any]:
    """GET /v2/models/{name}: the input, the outputs, the classes and the members."""
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


# -- handlers ---------------------------------------------------------------------------------

async def v2_infer(call: Call, server: Inference) -> Reply:
    """Infer with the named ensemble (its live or a loaded version), JSON or binary."""
    ensemble = server.ensemble(call.params["name"], call.params.get("version"))
    payload, x, wanted, binary_outputs = decode(
        call.body, call.headers.get("inference-header-content-length"), ensemble.input_spec,
        server.settings.max_rows_per_request, server.json_value_limit(ensemble))
    average, per_member, scores = await server.infer(call, ensemble, x)
    tensors = {n: output(n, ensemble, average, per_member, scores) for n in wanted}
    content, header_length = encode_outputs(ensemble.name, ensemble.version, payload.get("id"),
                                            tensors, binary_outputs)
    if header_length is None:
        return Reply(200, content)
    return Reply(200, content, b"application/octet-stream",
                 [(b"inference-header-content-length", str(header_length).encode())])


def _manager(request: Request):
    return request.app.state.manager


async def v2_server_metadata() -> Response:
    return as_response(json_reply({"name": "ensemble-serving", "version": "0.1.0",
                                   "extensions": ["binary_tensor_data"]}))


async def v2_live() -> Response:
    return as_response(json_reply({"live": True}))


async def v2_ready(request: Request) -> Response:
    ready, _ = _manager(request).readiness()
    return as_response(json_reply({"ready": ready}, 200 if ready else 503))


async def v2_model(request: Request, name: str, version: int | None = None) -> Response:
    return as_response(json_reply(model_metadata(_manager(request).get(name, version))))


async def v2_model_ready(request: Request, name: str, version: int | None = None) -> Response:
    _manager(request).get(name, version)
    return as_response(json_reply({"name": name, "ready": True}))


def register(app: FastAPI) -> None:
    """Add the health and metadata routes to the app (the Edge answers /infer)."""
    app.add_api_route("/v2", v2_server_metadata, methods=["GET"])
    app.add_api_route("/v2/health/live", v2_live, methods=["GET"])
    app.add_api_route("/v2/health/ready", v2_ready, methods=["GET"])
    app.add_api_route("/v2/models/{name}", v2_model, methods=["GET"])
    app.add_api_route("/v2/models/{name}/versions/{version}", v2_model, methods=["GET"])
    app.add_api_route("/v2/models/{name}/ready", v2_model_ready, methods=["GET"])
    app.add_api_route("/v2/models/{name}/versions/{version}/ready", v2_model_ready, methods=["GET"])


# -- schema -----------------------------------------------------------------------------------

_BODY = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "inputs": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": ["FP32", "FP64", "INT32", "INT64", "UINT8"]},
            "data": {"type": "array", "items": {}},
            "parameters": {"type": "object"}}}},
    "outputs": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "enum": list(OUTPUTS)},
        "parameters": {"type": "object"}}}}}}
_SUMMARY = "Open Inference Protocol infer (JSON, or binary tensors with Inference-Header-Content-Length)"

# (path template, handler, summary, request body schema); service.edge.inference matches and
# documents them.
ROUTES = (
    ("/v2/models/{name}/infer", v2_infer, _SUMMARY, _BODY),
    ("/v2/models/{name}/versions/{version}/infer", v2_infer, _SUMMARY, _BODY),
)
