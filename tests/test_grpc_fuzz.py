"""Property-based fuzzing (Hypothesis) of the gRPC server, the twin of tests/test_fuzz.py
(schemathesis has none for gRPC): arbitrary bytes as any method's message, valid messages with
bytes flipped, cut or inserted, and well-formed messages with impossible shapes, datatypes and
contents, for both protocols. Whatever comes in, the status is OK or one naming the client's
problem (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED): never INTERNAL or UNKNOWN, never a
traceback in the server's log, and the server goes on answering."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow_serving.apis import predict_pb2
from tritonclient.grpc import service_pb2

from tests.server import grpc_server

EXAMPLES = 150
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
METHODS = ["/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelMetadata",
           "/inference.GRPCInferenceService/ModelReady", "/inference.GRPCInferenceService/ServerReady",
           "/tensorflow.serving.PredictionService/Predict",
           "/tensorflow.serving.PredictionService/GetModelMetadata",
           "/tensorflow.serving.ModelService/GetModelStatus", "/grpc.health.v1.Health/Check"]
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def served(trained_repository):
    server = grpc_server(trained_repository)
    server.channel = grpc.insecure_channel(server.grpc)
    yield server
    server.channel.close()
    server.kill()


def call(served, method: str, payload: bytes) -> grpc.StatusCode:
    """The status of one call carrying `payload` as its serialized message."""
    stub = served.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        stub(payload, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_CODES, (method, exc.code(), exc.details(), payload[:100])
        assert exc.details(), method
        return exc.code()
    return grpc.StatusCode.OK


def valid_v2(rows: int = 1) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="instances", datatype="FP32", shape=[rows, 8, 8, 1])
    request.raw_input_contents.append(np.zeros((rows, 8, 8, 1), "<f4").tobytes())
    return request


def valid_tfs(rows: int = 1) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    tensor = request.inputs["instances"]
    tensor.dtype = 1  # DT_FLOAT
    tensor.tensor_shape.dim.extend([tensor.tensor_shape.Dim(size=d) for d in (rows, 8, 8, 1)])
    tensor.tensor_content = np.zeros((rows, 8, 8, 1), "<f4").tobytes()
    return request


VALID = {METHODS[0]: valid_v2().SerializeToString(), METHODS[4]: valid_tfs().SerializeToString()}


@st.composite
def damaged(draw) -> tuple[str, bytes]:
    """A valid message of either protocol with bytes flipped, cut or inserted."""
    method = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[method])
    for _ in range(draw(st.integers(1, 4))):
        kind, at = draw(st.sampled_from(["flip", "cut", "insert"])), draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        if not data:
            break
    return method, bytes(data)


dims = st.lists(st.sampled_from([-(2 ** 63), -1, 0, 1, 2, 8, 4096, 4097, 2 ** 31, 2 ** 62]) | st.integers(-3, 10),
                max_size=6)


@st.composite
def odd_v2(draw) -> bytes:
    """A well-formed ModelInferRequest with an impossible shape, datatype, contents or output."""
    request = valid_v2(draw(st.integers(1, 3)))
    tensor = request.inputs[0]
    if draw(st.booleans()):
        del tensor.shape[:]
        tensor.shape.extend(draw(dims))
    if draw(st.booleans()):
        tensor.datatype = draw(st.sampled_from(["FP16", "INT8", "UINT64", "BOOL", "BYTES", "", "fp32", "\u00e9"]))
    if draw(st.booleans()):
        del request.raw_input_contents[:]
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=70)))
        else:
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=70)))
    if draw(st.booleans()):
        request.raw_input_contents.append(draw(st.binary(max_size=300)))
    if draw(st.booleans()):
        request.outputs.add(name=draw(st.sampled_from(["probabilities", "members", "abstain", "x", ""])))
    request.model_version = draw(st.sampled_from(["", "1", "0", "99", "-1", "\u0661", "9" * 40]))
    return request.SerializeToString()


@st.composite
def odd_tfs(draw) -> bytes:
    """A well-formed PredictRequest with an impossible shape, dtype, values or filter."""
    request = valid_tfs(draw(st.integers(1, 3)))
    tensor = request.inputs["instances"]
    if draw(st.booleans()):
        tensor.tensor_shape.ClearField("dim")
        tensor.tensor_shape.dim.extend([tensor.tensor_shape.Dim(size=d) for d in draw(dims)])
    if draw(st.booleans()):
        tensor.dtype = draw(st.sampled_from([0, 2, 3, 4, 6, 7, 9, 10, 14, 19, 20, 23, 101, 999]))
    if draw(st.booleans()):
        tensor.tensor_content = b""
        field = draw(st.sampled_from(["float_val", "int_val", "int64_val", "half_val", "bool_val", "uint64_val"]))
        values = {"float_val": st.floats(width=32), "int_val": st.integers(-(2 ** 31), 2 ** 31 - 1),
                  "int64_val": st.integers(-(2 ** 63), 2 ** 63 - 1), "half_val": st.integers(-(2 ** 31), 2 ** 31 - 1),
                  "bool_val": st.booleans(), "uint64_val": st.integers(0, 2 ** 64 - 1)}[field]
        getattr(tensor, field).extend(draw(st.lists(values, max_size=70)))
    if draw(st.booleans()):
        tensor.tensor_shape.unknown_rank = True
    if draw(st.booleans()):
        request.output_filter.append(draw(st.sampled_from(["predictions", "labels", "abstain", "x"])))
    if draw(st.booleans()):
        request.model_spec.version.value = draw(st.sampled_from([-5, 0, 1, 2 ** 62]))
    return request.SerializeToString()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESS)
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=200))
def test_arbitrary_bytes_as_any_message(served, method, payload):
    call(served, method, payload)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESS)
@given(damaged())
def test_valid_messages_with_damaged_bytes(served, case):
    call(served, *case)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESS)
@given(payload=odd_v2())
def test_open_inference_protocol_requests_with_impossible_parts(served, payload):
    call(served, METHODS[0], payload)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESS)
@given(payload=odd_tfs())
def test_tensorflow_serving_requests_with_impossible_parts(served, payload):
    call(served, METHODS[4], payload)


def test_the_fuzzed_server_still_answers_and_logged_no_traceback(served):
    assert call(served, METHODS[0], VALID[METHODS[0]]) == grpc.StatusCode.OK
    assert call(served, METHODS[4], VALID[METHODS[4]]) == grpc.StatusCode.OK
    assert "Traceback" not in served.output()


def test_a_message_that_does_not_decode_is_invalid_argument_naming_it(served):
    """gRPC's own answer to a failed parse is INTERNAL; here it is the client's error."""
    stub = served.channel.unary_unary(METHODS[4], request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as failed:
        stub(b"\x0a\xff", timeout=30)  # field 1 (model_spec), a length past the end
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tensorflow.serving.PredictRequest message" in failed.value.details()
