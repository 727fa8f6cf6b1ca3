"""TensorFlow Serving over gRPC against a real `ensemble-serve` process, with
tensorflow-serving-api's own client stubs and TensorFlow's tensor helpers: Predict agrees with
POST /predict, GetModelMetadata describes the signature, GetModelStatus the versions, each error
of the REST suite gets its gRPC twin, and the server's own definitions (service/protocols/gen/tfs)
match the package's field for field."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service.protocols import tfs_messages
from tests.server import grpc_server

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def served(trained_repository, tmp_path_factory):
    server = grpc_server(trained_repository, tmp_path_factory.mktemp("grpc-tfs") / "models")
    server.channel = grpc.insecure_channel(server.grpc)
    server.predictions = prediction_service_pb2_grpc.PredictionServiceStub(server.channel)
    server.models = model_service_pb2_grpc.ModelServiceStub(server.channel)
    try:
        yield server
    finally:
        server.channel.close()
        server.kill()


@pytest.fixture(scope="module")
def rows(digits_test_split):
    return digits_test_split.x[:12].astype("float32")


def predict_request(x, name="digits", input_name="instances", **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    if x is not None:
        request.inputs[input_name].CopyFrom(tf.make_tensor_proto(x))
    return request


def test_the_servers_definitions_match_tensorflow_serving_api_field_for_field():
    """Every message, enum and method the server defines exists in tensorflow-serving-api's
    (and TensorFlow's) definitions with the same numbers, types and names."""
    from google.protobuf import descriptor_pool

    theirs = descriptor_pool.Default()
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401 (registers them)

    checked = 0
    for file in tfs_messages.FILES.file:
        if file.name.startswith("google/protobuf/"):
            continue
        prefix = f"{file.package}."
        for message in file.message_type:
            checked += _same_message(prefix + message.name, message, theirs)
        for enum in file.enum_type:
            _same_enum(prefix + enum.name, enum, theirs)
        for service in file.service:
            real = theirs.FindServiceByName(prefix + service.name)
            for method in service.method:
                other = real.methods_by_name[method.name]
                assert "." + other.input_type.full_name == method.input_type
                assert "." + other.output_type.full_name == method.output_type
    assert checked >= 15


def _same_message(full_name: str, mine: descriptor_pb2.DescriptorProto, pool) -> int:
    real = descriptor_pb2.DescriptorProto()
    pool.FindMessageTypeByName(full_name).CopyToProto(real)
    fields = {f.number: f for f in real.field}
    for field in mine.field:
        other = fields[field.number]
        assert (field.name, field.type, field.label, field.type_name) == \
            (other.name, other.type, other.label, other.type_name), f"{full_name}.{field.name}"
        assert field.options.packed == other.options.packed or not other.options.HasField("packed")
    for enum in mine.enum_type:
        _same_enum(f"{full_name}.{enum.name}", enum, pool)
    return 1 + sum(_same_message(f"{full_name}.{n.name}", n, pool) for n in mine.nested_type)


def _same_enum(full_name: str, mine, pool) -> None:
    real = pool.FindEnumTypeByName(full_name)
    for value in mine.value:
        assert real.values_by_name[value.name].number == value.number, f"{full_name}.{value.name}"


def test_predict_agrees_with_post_predict(served, rows):
    http = httpx.post(f"{served.base}/v1/models/digits:predict?members=true&uncertainty=true",
                      json={"instances": rows.tolist()}, timeout=30).json()
    reply = served.predictions.Predict(predict_request(rows), timeout=30)
    assert reply.model_spec.name == "digits" and reply.model_spec.version.value == 1
    assert reply.model_spec.signature_name == "serving_default"
    out = {name: tf.make_ndarray(tensor) for name, tensor in reply.outputs.items()}
    np.testing.assert_allclose(out["predictions"], http["predictions"], atol=1e-6)
    assert [v.decode() for v in out["labels"]] == http["labels"]
    members = np.stack([http["members"][name] for name in http["members"]], axis=1)
    np.testing.assert_allclose(out["members"], members, atol=1e-6)
    np.testing.assert_allclose(out["disagreement"], http["disagreement"], atol=1e-6)
    for score in ("entropy", "expected_entropy", "mutual_information"):
        np.testing.assert_allclose(out[score], http["uncertainty"][score], atol=1e-6)
    assert ("abstain" in out) == ("abstain" in http)


def test_predict_with_typed_values_a_filter_and_a_version(served, rows):
    request = predict_request(None, version=1, signature_name="serving_default")
    tensor = request.inputs["instances"]
    tensor.dtype = tf.float64.as_datatype_enum
    tensor.tensor_shape.dim.extend([tensor.tensor_shape.Dim(size=d) for d in rows.shape])
    tensor.double_val.extend(rows.reshape(-1).astype("float64").tolist())
    request.output_filter.extend(["predictions", "predictions"])
    reply = served.predictions.Predict(request, timeout=30)
    assert list(reply.outputs) == ["predictions"]
    raw = tf.make_ndarray(served.predictions.Predict(predict_request(rows), timeout=30).outputs["predictions"])
    np.testing.assert_allclose(tf.make_ndarray(reply.outputs["predictions"]), raw, atol=1e-6)
    fill = predict_request(None)  # one value fills the shape, as in TensorFlow
    fill.inputs["instances"].CopyFrom(tf.make_tensor_proto(0.5, dtype=tf.float32, shape=[3, 8, 8, 1]))
    assert len(fill.inputs["instances"].float_val) == 1
    filled = tf.make_ndarray(served.predictions.Predict(fill, timeout=30).outputs["predictions"])
    assert filled.shape == (3, 10) and np.allclose(filled[0], filled[2])


def test_model_metadata_is_the_serving_default_signature(served):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    reply = served.predictions.GetModelMetadata(request, timeout=30)
    assert reply.model_spec.name == "digits" and reply.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert reply.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    instances = signature.inputs["instances"]
    assert instances.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in instances.tensor_shape.dim] == [-1, 8, 8, 1]
    assert set(signature.outputs) >= {"predictions", "labels", "members", "disagreement", "entropy",
                                      "expected_entropy", "mutual_information"}
    assert signature.outputs["labels"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in signature.outputs["members"].tensor_shape.dim] == [-1, 5, 10]
    # every output of the signature is what Predict answers
    reply = served.predictions.Predict(predict_request(np.zeros((2, 8, 8, 1), "float32")), timeout=30)
    assert set(reply.outputs) == set(signature.outputs)


def test_model_status_lists_the_versions(served):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "digits"
    reply = served.models.GetModelStatus(request, timeout=30)
    states = {s.version: s.state for s in reply.model_version_status}
    assert states == {1: get_model_status_pb2.ModelVersionStatus.AVAILABLE}
    assert reply.model_version_status[0].status.error_code == 0
    request.model_spec.version.value = 1
    assert len(served.models.GetModelStatus(request, timeout=30).model_version_status) == 1
    for name, version in (("nope", None), ("digits", 9)):
        missing = get_model_status_pb2.GetModelStatusRequest()
        missing.model_spec.name = name
        if version:
            missing.model_spec.version.value = version
        with pytest.raises(grpc.RpcError) as failed:
            served.models.GetModelStatus(missing, timeout=30)
        assert failed.value.code() == Code.NOT_FOUND


def _predict_cases(rows):
    one = rows[:1]
    cases = [
        (predict_request(one, input_name="x"), Code.INVALID_ARGUMENT, "exactly one tensor, 'instances'"),
        (predict_request(rows[:, :4, :4]), Code.INVALID_ARGUMENT, "shape must be [rows, 8, 8, 1]"),
        (predict_request(np.zeros((5000, 8, 8, 1), "float32")), Code.INVALID_ARGUMENT, "at most 4096"),
        (predict_request(np.full((1, 8, 8, 1), np.nan, "float32")), Code.INVALID_ARGUMENT, "non-finite"),
        (predict_request(np.array([["a"] * 1] * 1)), Code.INVALID_ARGUMENT, "dtype DT_STRING is not one of"),
        (predict_request(one, name="nope"), Code.NOT_FOUND, "nope"),
        (predict_request(one, version=7), Code.NOT_FOUND, "version 7"),
        (predict_request(one, version_label="stable"), Code.NOT_FOUND, "no version labels"),
        (predict_request(one, signature_name="other"), Code.INVALID_ARGUMENT, "signature 'other' not found"),
        (predict_request(one, name=""), Code.INVALID_ARGUMENT, "model_spec.name is empty"),
        (predict_request(None), Code.INVALID_ARGUMENT, "got none"),
    ]
    short = predict_request(one)
    short.inputs["instances"].tensor_content = b"\0" * 10
    cases.append((short, Code.INVALID_ARGUMENT, "tensor_content has 10 bytes"))
    few = predict_request(None)
    few.inputs["instances"].CopyFrom(tf.make_tensor_proto([1.0, 2.0], dtype=tf.float32))
    few.inputs["instances"].tensor_shape.Clear()
    few.inputs["instances"].tensor_shape.dim.extend([few.inputs["instances"].tensor_shape.Dim(size=d)
                                                     for d in (1, 8, 8, 1)])
    few.inputs["instances"].tensor_content = b""
    few.inputs["instances"].float_val.extend([1.0, 2.0])
    cases.append((few, Code.INVALID_ARGUMENT, "float_val holds 2 values"))
    wide = predict_request(None)
    wide.inputs["instances"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8, 8, 1), "uint8")))
    wide.inputs["instances"].tensor_content = b""
    wide.inputs["instances"].int_val.extend([300] * 64)
    cases.append((wide, Code.INVALID_ARGUMENT, "outside the range"))
    unknown = predict_request(one)
    unknown.output_filter.append("logits")
    cases.append((unknown, Code.INVALID_ARGUMENT, "output 'logits' is not in signature"))
    return cases


def test_every_refusal_of_the_rest_suite_has_its_grpc_twin(served, rows):
    for request, code, message in _predict_cases(rows):
        with pytest.raises(grpc.RpcError) as failed:
            served.predictions.Predict(request, timeout=30)
        assert (failed.value.code(), message in failed.value.details()) == (code, True), failed.value.details()
    for fields, message in (([], "metadata_field is empty"), (["other"], "'other' is not supported")):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
        request.model_spec.name = "digits"
        with pytest.raises(grpc.RpcError) as failed:
            served.predictions.GetModelMetadata(request, timeout=30)
        assert failed.value.code() == Code.INVALID_ARGUMENT and message in failed.value.details()
    with pytest.raises(grpc.RpcError) as failed:  # not served here: UNIMPLEMENTED, as gRPC says it
        served.predictions.Classify(classification_pb2.ClassificationRequest(), timeout=30)
    assert failed.value.code() == Code.UNIMPLEMENTED
    assert httpx.get(f"{served.base}/readyz").status_code == 200


def test_a_grpc_server_on_tensorflow_lite_versions_never_loads_tensorflow(served, rows):
    served.predictions.Predict(predict_request(rows[:1]), timeout=30)
    (version,) = httpx.get(f"{served.base}/models").json()["models"][0]["versions"]
    assert version["engine"] == "tflite"
    libraries = Path(f"/proc/{served.proc.pid}/maps").read_text()
    assert "libtensorflow_framework" not in libraries and "_pywrap_tensorflow_internal" not in libraries


def test_grpc_calls_are_counted_with_their_protocol(served, rows):
    served.predictions.Predict(predict_request(rows[:1]), timeout=30)
    with pytest.raises(grpc.RpcError):
        served.predictions.Predict(predict_request(rows[:1], name="nope"), timeout=30)
    text = httpx.get(f"{served.base}/metrics").text
    route = "/tensorflow.serving.PredictionService/Predict"
    assert f'ensemble_requests_total{{protocol="grpc",route="{route}",status="200"}}' in text
    assert f'ensemble_requests_total{{protocol="grpc",route="{route}",status="404"}}' in text
    assert 'ensemble_requests_total{protocol="http",route="/readyz",status="200"}' in text
