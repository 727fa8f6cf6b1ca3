"""The Open Inference Protocol (KServe V2), its codec for both of its encodings: the JSON body
(with binary tensors after a JSON header, the binary tensor extension) and the protobuf
messages of `inference.GRPCInferenceService`. It knows nothing of HTTP or gRPC: service.edge.v2
and service.rpc.v2 carry it.

A format-1 version takes one input tensor (`instances`, the manifest's shape with a batch
dimension first) and answers `probabilities` (rows, classes, the default), `members` (rows,
members, classes), the uncertainty scores `entropy`, `expected_entropy` and
`mutual_information` (rows, FP32, contract.scores), and `abstain` (rows, BOOL; for versions
with an abstention threshold).

A format-2 version takes one tensor per named input, in any order, each of its input's datatype
family (any numeric datatype for a number, which is cast to the input's dtype; BOOL; BYTES for
a string), and answers the outputs of service.protocols.named (by default every head's combined
value); the request's `interval` parameter sets the level of a regression head's `H.lower` and
`H.upper`. BYTES travel as the protocol says: JSON strings in `data`, and in binary each
element as a 4-byte little-endian length then its bytes.

In JSON each output is `data` or raw little-endian bytes as the request asks; in a message, raw
bytes for every output when the request sent its inputs raw or asks for any output with the
`binary_data` parameter (the protocol has raw contents for every output or for none), else typed
contents.
"""

from __future__ import annotations

import math
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from contract.manifest import InputSpec, Signature, TensorSpec
from contract.scores import SCORES
from service.answer import Answer
from service.errors import InvalidInput, MalformedRequest, ModelNotFound
from service.protocols import named
from service.protocols.arrays import booleans, encode, narrowed, numeric, parse_json_object, strings, to_spec

if TYPE_CHECKING:
    from service.protocols.gen import grpc_predict_v2_pb2 as pb
DATATYPES = {"FP32": "float32", "FP64": "float64", "INT32": "int32", "INT64": "int64",
             "UINT8": "uint8", "INT16": "int16", "INT8": "int8", "UINT16": "uint16", "FP16": "float16"}
_NAMES = {**{v: k for k, v in DATATYPES.items()}, "bool": "BOOL", "object": "BYTES", "string": "BYTES"}
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
_LENGTH = 4  # the bytes of a BYTES element's length prefix


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
    named.check_rows(shape[0], max_rows, where)
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


def wanted_outputs(payload: dict[str, Any], available: Any = OUTPUTS,
                   default: tuple[str, ...] = ("probabilities",)) -> tuple[list[str], set[str]]:
    """(outputs to return, those to return as binary) from a V2 request's `outputs`/`parameters`:
    `default` when it names none; each named must be one of `available`."""
    all_binary = parameters(payload, "").get("binary_data_output", False) is True
    requested = payload.get("outputs")
    if requested is None:
        return list(default), (set(default) if all_binary else set())
    if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        raise InvalidInput("'outputs' must be a list of {\"name\": \"...\"}")
    names, binary = [], set()
    for i, output in enumerate(requested):
        if output["name"] not in available:
            raise InvalidInput(f"unknown output {output['name'][:100]!r}; this model has "
                               f"{', '.join(list(available)[:24])}")
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


def decode_named(body: bytes, header_length: str | None, signature: Signature, max_rows: int,
                 max_values: int) -> tuple[Any, dict[str, np.ndarray], list[tuple[str, str]], set[str], float]:
    """A format-2 version's infer request: (its id, its named inputs, the outputs wanted as
    (name, head), those wanted as binary, the interval level)."""
    head, binary = split_binary_body(body, header_length)
    payload = parse_json_object(head, max_values)
    x = named_inputs(payload, binary, signature, max_rows)
    catalogue = named.outputs_of(signature)
    wanted, binary_outputs = wanted_outputs(payload, catalogue, tuple(h.name for h in signature.heads))
    level = parameters(payload, "").get("interval")
    level = named.DEFAULT_LEVEL if level is None else named.level_of(level, "parameters.interval")
    return payload.get("id"), x, [(name, catalogue[name][2]) for name in wanted], binary_outputs, level


def named_inputs(payload: dict[str, Any], binary: bytes, signature: Signature, max_rows: int) -> dict[str, np.ndarray]:
    """The named input tensors of a JSON infer request: `data`, or the next bytes of the binary
    part (in the order of the inputs) for one declaring `binary_data_size`."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("missing field 'inputs': send [{\"name\", \"shape\", \"datatype\", \"data\"}, ...], "
                           f"one per input of {[spec.name for spec in signature.inputs]}")
    given: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise InvalidInput(f"{where} must be an object with a name, shape, datatype and data")
        spec = named.input_spec(signature, tensor.get("name"), where, given)
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidInput(f"{where}.shape must be a list of non-negative integers")
        count = named.check_shape(shape, spec, max_rows, where)
        datatype_name = _datatype_for(spec, tensor.get("datatype"), DATATYPES, where)
        size = parameters(tensor, f"{where}.").get("binary_data_size")
        if size is not None:
            if type(size) is not int or not 0 <= size <= len(binary) - offset:
                raise InvalidInput(f"{where} declares binary_data_size {str(size)[:20]}; the binary part has "
                                   f"{len(binary) - offset} bytes left for it")
            flat = raw_tensor(binary[offset:offset + size], datatype_name, count, where)
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidInput(f"{where} has neither 'data' nor parameters.binary_data_size")
            flat = _json_data(tensor["data"], spec, f"{where}.data")
            if flat.size != count:
                raise InvalidInput(f"{where}.data holds {flat.size} values; shape {shape} needs {count}")
        given[spec.name] = named.cast(flat.reshape(shape), spec, where)
    if offset != len(binary):
        raise InvalidInput(f"the binary part of the body has {len(binary)} bytes; the inputs declare {offset}")
    return named.check_complete(given, signature)


def _datatype_for(spec: TensorSpec, given: object, numeric_types: dict[str, str], where: str) -> str:
    """The tensor's datatype, checked against its input's: BYTES for a string, BOOL for a bool,
    one of `numeric_types` for a number."""
    if spec.dtype == "string":
        allowed: Any = ("BYTES",)
    elif spec.dtype == "bool":
        allowed = ("BOOL",)
    else:
        allowed = numeric_types
    if not isinstance(given, str) or given not in allowed:
        raise InvalidInput(f"{where}.datatype {str(given)[:40]!r}: input {spec.name!r} ({spec.dtype}) takes "
                           f"{', '.join(allowed)}")
    return given


def _json_data(data: Any, spec: TensorSpec, where: str) -> np.ndarray:
    """A tensor's JSON `data`, flat; a null is a nullable input's missing value (NaN, or the
    empty string), and refused in any other."""
    if spec.dtype == "string":
        return strings(data, where, spec).reshape(-1)
    if spec.dtype == "bool":
        return booleans(data, where, spec).reshape(-1)
    return numeric(data, where, spec=spec).reshape(-1)


def raw_tensor(raw: bytes, datatype_name: str, count: int, where: str) -> np.ndarray:
    """A tensor's `count` values (flat) from its raw bytes: BYTES elements each a 4-byte
    little-endian length then its bytes; BOOL one byte each; numbers little-endian."""
    if datatype_name == "BYTES":
        return bytes_elements(raw, count, where)
    dtype = np.dtype("uint8" if datatype_name == "BOOL" else DATATYPES[datatype_name]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"{where} has {len(raw)} bytes of {datatype_name}; {count} values need "
                           f"{count * dtype.itemsize}")
    array = np.frombuffer(raw, dtype=dtype)
    return array != 0 if datatype_name == "BOOL" else array


def bytes_elements(raw: bytes, count: int, where: str) -> np.ndarray:
    """`count` BYTES elements, each a 4-byte little-endian length then its bytes, filling `raw`
    exactly; InvalidInput where they do not."""
    if count * _LENGTH > len(raw):
        raise InvalidInput(f"{where} has {len(raw)} bytes; {count} BYTES elements need at least {count * _LENGTH} "
                           "(each a 4-byte little-endian length, then its bytes)")
    out = np.empty(count, dtype=object)
    position, end = 0, len(raw)
    for i in range(count):
        if position + _LENGTH > end:
            raise InvalidInput(f"{where}: its bytes end before BYTES element {i} of {count}")
        length = int.from_bytes(raw[position:position + _LENGTH], "little")
        position += _LENGTH
        if position + length > end:
            raise InvalidInput(f"{where}: BYTES element {i} declares {length} bytes; {end - position} are left")
        out[i] = raw[position:position + length]
        position += length
    if position != end:
        raise InvalidInput(f"{where} has {end - position} bytes after its {count} BYTES elements")
    return out


def bytes_blob(array: np.ndarray) -> bytes:
    """An array of bytes objects as BYTES raw contents: each a 4-byte little-endian length, then it."""
    parts = []
    for value in array.reshape(-1).tolist():
        parts += (len(value).to_bytes(_LENGTH, "little"), value)
    return b"".join(parts)


# -- encode -----------------------------------------------------------------------------------

def encode_outputs(model: str, version: int, request_id: Any, tensors: dict[str, np.ndarray],
                   binary: set[str]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): JSON outputs inline, binary ones appended raw."""
    outputs, raw = [], []
    for name, array in tensors.items():
        strings_out = array.dtype == object  # BYTES: bytes objects
        if not strings_out:
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype(array.dtype.name)}
        if name in binary:
            blob = bytes_blob(array) if strings_out else array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            raw.append(blob)
        elif strings_out:
            entry["data"] = [value.decode("utf-8", "replace") for value in array.reshape(-1).tolist()]
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
    as -1), every output tensor (service.protocols.named), each head's task and labels, and the
    inputs that take a missing value (`nullable`, when any does: the protocol's tensor metadata
    has no field for it, so it is among the model's parameters, beside the heads)."""
    signature, members = ensemble.signature, len(ensemble.member_names)
    nullable = [spec.name for spec in signature.inputs if spec.nullable]
    return {
        "name": ensemble.name,
        "versions": [str(ensemble.version)],
        "platform": "tensorflow_savedmodel_ensemble",
        "inputs": [{"name": spec.name, "datatype": _NAMES[spec.dtype],
                    "shape": [-1, *(-1 if d is None else d for d in spec.shape)]} for spec in signature.inputs],
        "outputs": [{"name": name, "datatype": _NAMES[dtype], "shape": list(named.shape_of(shape, members))}
                    for name, (dtype, shape, _) in named.outputs_of(signature).items()],
        "parameters": {"heads": {head.name: {"task": head.task, "labels": list(head.labels)}
                                 for head in signature.heads},
                       "members": list(ensemble.member_names),
                       **({"nullable": nullable} if nullable else {})},
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


def message_outputs(request: pb.ModelInferRequest, available: Any = OUTPUTS,
                    default: tuple[str, ...] = ("probabilities",)) -> list[tuple[str, bool]]:
    """(output name, as raw bytes) of each output asked for, each one of `available`; `default`
    when none is."""
    raw = bool(request.raw_input_contents)
    if not request.outputs:
        return [(name, raw) for name in default]
    names = []
    for o in request.outputs:
        if o.name not in available:
            raise InvalidInput(f"unknown output {o.name[:100]!r}; this model has {', '.join(list(available)[:24])}")
        binary = o.parameters["binary_data"].bool_param if "binary_data" in o.parameters else False
        names.append((o.name, raw or binary))
    return names


def message_named(request: pb.ModelInferRequest, signature: Signature, max_rows: int) -> dict[str, np.ndarray]:
    """A format-2 version's named inputs in a ModelInferRequest: each tensor from its typed
    contents (`bytes_contents` for BYTES) or, when the request sends raw contents, from the raw
    contents at its position."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents holds {len(raw)} tensors; {len(request.inputs)} inputs were sent")
    given: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}]"
        spec = named.input_spec(signature, tensor.name, where, given)
        shape = list(tensor.shape)
        count = named.check_shape(shape, spec, max_rows, where)
        datatype_name = _datatype_for(spec, tensor.datatype, _TYPED, where)
        if raw:
            flat = raw_tensor(raw[i], datatype_name, count, f"raw_input_contents[{i}]")
        else:
            field = "bytes_contents" if datatype_name == "BYTES" else CONTENTS[datatype_name]
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise InvalidInput(f"{where}.contents holds {len(values)} values in {field}; shape {shape[:10]} "
                                   f"needs {count}")
            if datatype_name == "BYTES":
                flat = np.empty(count, dtype=object)
                flat[:] = list(values)
            else:
                wide = np.asarray(values, dtype=_WIDE[field])
                flat = wide if datatype_name == "BOOL" else narrowed(wide, np.dtype(_TYPED[datatype_name]),
                                                                      f"{where}.contents")
        given[spec.name] = named.cast(flat.reshape(shape), spec, where)
    return named.check_complete(given, signature)


def message_level(request: pb.ModelInferRequest) -> float:
    """The level of a regression head's interval: the request's `interval` parameter (a double,
    as KServe's and Triton's clients send a float, or its text), else the default."""
    if "interval" not in request.parameters:
        return named.DEFAULT_LEVEL
    parameter = request.parameters["interval"]
    kind = parameter.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidInput("parameters['interval'] holds no value; send a level between 0 and 1 (e.g. 0.9)")
    value = getattr(parameter, kind)
    if kind == "string_param":
        try:
            value = float(value)
        except ValueError:
            value = value[:20]
    return named.level_of(value, "parameters['interval']")


def version_of(text: str) -> str | None:
    """A request's model version: None when empty (the live one), else its digits; NOT_FOUND
    for anything else (HTTP routes only match digits)."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ModelNotFound(f"version {text[:20]!r} is not a version number")
    return text


def infer_response(answer: Answer, request_id: str, outputs: list[tuple[str, bool]]) -> pb.ModelInferResponse:
    """The ModelInferResponse of a format-1 answer: the outputs asked for (`message_outputs`)."""
    return tensors_response(answer, request_id, [(name, output(name, answer), raw) for name, raw in outputs])


def named_response(answer: Answer, request_id: str, outputs: list[tuple[str, bool]], signature: Signature,
                   level: float) -> pb.ModelInferResponse:
    """The ModelInferResponse of a format-2 answer: the outputs asked for (service.protocols.named)."""
    catalogue = named.outputs_of(signature)
    return tensors_response(answer, request_id, [(name, named.output(answer, name, catalogue[name][2], level), raw)
                                                 for name, raw in outputs])


def tensors_response(answer: Answer, request_id: str,
                     tensors: list[tuple[str, np.ndarray, bool]]) -> pb.ModelInferResponse:
    """A ModelInferResponse of (name, array, asked raw) tensors: all raw bytes if any is asked
    raw (the protocol: raw for every output or for none), else typed contents."""
    pb = messages()
    reply = pb.ModelInferResponse(model_name=answer.name, model_version=str(answer.version), id=request_id)
    raw_all = any(raw for _, _, raw in tensors)
    for name, array, _ in tensors:
        array = np.ascontiguousarray(array)
        name_of_type = datatype(array.dtype.name)
        tensor = reply.outputs.add(name=name, datatype=name_of_type, shape=list(array.shape))
        if name_of_type == "BYTES":
            if raw_all:
                reply.raw_output_contents.append(bytes_blob(array))
            else:
                tensor.contents.bytes_contents.extend(array.reshape(-1).tolist())
        elif raw_all:
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
