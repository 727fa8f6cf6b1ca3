"""The gRPC message halves of two protocol codecs, in process: service.protocols.oip (the Open
Inference Protocol's ModelInferRequest, ModelInferResponse and ModelMetadataResponse) and
service.protocols.tfs (TensorFlow Serving's Predict, GetModelMetadata and GetModelStatus). No
server, no network, no TensorFlow, no Keras: requests are built by hand, the ensemble and its
answer are light doubles, and every test asserts exact values, messages and fields, so that a
one-line change to a codec fails one of them (they are written for mutation testing). The last
section holds the two bugs it found, now fixed.

Why tritonclient's classes for the OIP messages: this process also imports tritonclient
(tests/test_grpc.py), whose `tritonclient.grpc.service_pb2` registers the same `inference.*`
messages in protobuf's default pool, so importing the service's own generated module
(service.protocols.gen.grpc_predict_v2_pb2, which `oip.messages()` loads) here would raise
"duplicate symbol". The wire format and field names are the same: requests are built with
tritonclient's classes and the `pb` fixture points `oip.messages` at them for the responses.
The TensorFlow Serving messages live in a private pool (service.protocols.tfs_messages) and are
used directly.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from contract.manifest import Abstention, InputSpec
from service.answer import Answer
from service.errors import InvalidInput, ModelNotFound, PayloadTooLarge
from service.protocols import oip, tfs
from service.protocols import tfs_messages as m

# -- doubles ------------------------------------------------------------------------------------

ABSTENTION = Abstention(score="entropy", threshold=0.5, target_error=0.1, coverage=0.8)
SCORE_NAMES = ("entropy", "expected_entropy", "mutual_information")

# Two rows, two members, three classes, every value distinct where a swap could hide.
COMBINED = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=np.float32)  # top labels b, a
MEMBERS = np.array([[[0.1, 0.7, 0.2], [0.3, 0.3, 0.4]],  # row 0: members say b, c (disagreement 0.5)
                    [[0.5, 0.2, 0.3], [0.7, 0.0, 0.3]]], dtype=np.float32)  # row 1: a, a (0.0)
# entropy, expected_entropy, mutual_information, abstain (1.0: row 0 abstains)
SCORES = np.array([[0.9, 0.4, 0.5, 1.0], [0.3, 0.2, 0.1, 0.0]], dtype=np.float32)
EXPECTED_SCORES = {"entropy": [0.9, 0.3], "expected_entropy": [0.4, 0.2], "mutual_information": [0.5, 0.1]}


def ensemble(abstention=None, shape=(2,), dtype="float32"):
    """An ensemble as the codecs read it: name, version, input spec, classes, manifest."""
    manifest = SimpleNamespace(format_version=1, members=[SimpleNamespace(name="m0"), SimpleNamespace(name="m1")],
                               temperature=1.5, abstention=abstention)
    return SimpleNamespace(name="digits", version=3, input_spec=InputSpec(shape=shape, dtype=dtype),
                           classes=("a", "b", "c"), manifest=manifest)


def answer(abstains=True, combined=COMBINED):
    """digits/3's answer for two rows, with or without an abstention rule, as an engine's three
    arrays become one (service.answer.Answer.of, reading only these fields of the manifest)."""
    manifest = SimpleNamespace(format_version=1, name="digits", version=3,
                               output=SimpleNamespace(classes=("a", "b", "c")),
                               abstention=ABSTENTION if abstains else None)
    return Answer.of(manifest, (combined, MEMBERS, SCORES), ("m0", "m1"))


def refused(exc: type[Exception], message: str):
    """pytest.raises for exactly `message` (the whole of it)."""
    return pytest.raises(exc, match=rf"^{re.escape(message)}$")


SPEC = InputSpec(shape=(2,))  # float32
SPEC64 = InputSpec(shape=(2,), dtype="float64")  # every test value is exact in it
SPEC23 = InputSpec(shape=(2, 3))

# == Open Inference Protocol ====================================================================

OIP_OUTPUTS = "probabilities, members, entropy, expected_entropy, mutual_information, abstain"
OIP_TYPES = "FP32, FP64, INT32, INT64, UINT8, INT16, INT8, UINT16"


@pytest.fixture
def pb(monkeypatch):
    """oip's messages, tritonclient's classes (see the module's docstring)."""
    monkeypatch.setattr(oip, "messages", lambda: service_pb2)
    return service_pb2


def infer_request(datatype="FP32", shape=(2, 2), field=None, values=(), raw=None, outputs=()):
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="instances", datatype=datatype, shape=list(shape))
    if field is not None:
        getattr(tensor.contents, field).extend(values)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    for name, binary in outputs:
        o = request.outputs.add(name=name)
        if binary is not None:
            o.parameters["binary_data"].bool_param = binary
    return request


# -- message_input ------------------------------------------------------------------------------

@pytest.mark.parametrize("datatype, field, values", [
    ("FP32", "fp32_contents", [1.5, -2.25, 0.0, 1e6]),
    ("FP64", "fp64_contents", [0.1, -1e300, 2.0, 3.0]),
    ("INT32", "int_contents", [-2**31, 2**31 - 1, 0, 7]),
    ("INT64", "int64_contents", [-2**53, 2**53, 0, 7]),
    ("UINT8", "uint_contents", [0, 255, 1, 2]),
    ("INT16", "int_contents", [-32768, 32767, 1000, -1000]),
    ("INT8", "int_contents", [-128, 127, 0, 1]),
    ("UINT16", "uint_contents", [65535, 0, 1, 2]),
])
def test_oip_typed_contents_of_each_datatype(datatype, field, values):
    x = oip.message_input(infer_request(datatype, (2, 2), field, values), SPEC64, 4)
    assert x.dtype == np.float64 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, np.array(values, dtype=np.float64).reshape(2, 2))


def test_oip_typed_contents_cast_to_an_integer_spec():
    x = oip.message_input(infer_request("INT64", (1, 2), "int64_contents", [-5, 2**40]),
                          InputSpec(shape=(2,), dtype="int64"), 4)
    assert x.dtype == np.int64
    np.testing.assert_array_equal(x, [[-5, 2**40]])


@pytest.mark.parametrize("datatype, little_endian, values", [
    ("FP32", "<f4", [1.5, -2.25, 3.0, 1e6]),
    ("FP64", "<f8", [0.1, -1e300, 2.0, 3.0]),
    ("INT64", "<i8", [-2**53, 2**53, 1, -1]),
    ("INT16", "<i2", [-32768, 32767, 1, -1]),
    ("UINT8", "u1", [0, 255, 1, 2]),
])
def test_oip_raw_contents(datatype, little_endian, values):
    raw = np.array(values, dtype=little_endian).tobytes()
    x = oip.message_input(infer_request(datatype, (2, 2), raw=[raw]), SPEC64, 4)
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x, np.array(values, dtype=np.float64).reshape(2, 2))


def test_oip_raw_contents_win_over_typed_contents():
    raw = np.array([1.0, 2.0], dtype="<f4").tobytes()
    x = oip.message_input(infer_request("FP32", (1, 2), "fp32_contents", [7.0, 8.0], raw=[raw]), SPEC, 4)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[1.0, 2.0]])


def test_oip_rows_up_to_the_limit_are_taken():
    x = oip.message_input(infer_request("FP32", (3, 2), "fp32_contents", [1, 2, 3, 4, 5, 6]), SPEC, 3)
    np.testing.assert_array_equal(x, [[1, 2], [3, 4], [5, 6]])


def test_oip_input_count_refusals():
    request = service_pb2.ModelInferRequest(model_name="digits")
    with refused(InvalidInput, "'inputs' holds 0 tensors; this model takes exactly one"):
        oip.message_input(request, SPEC, 4)
    request = infer_request("FP32", (1, 2), "fp32_contents", [1.0, 2.0])
    request.inputs.add(name="other", datatype="FP32", shape=[1, 2])
    with refused(InvalidInput, "'inputs' holds 2 tensors; this model takes exactly one"):
        oip.message_input(request, SPEC, 4)


@pytest.mark.parametrize("datatype", ["FP16", "BOOL", "UINT32", "fp32", ""])
def test_oip_datatypes_without_a_typed_field_are_refused(datatype):
    with refused(InvalidInput, f"inputs[0].datatype {datatype!r} is not one of {OIP_TYPES}"):
        oip.message_input(infer_request(datatype, (1, 2), raw=[b"\0" * 8]), SPEC, 4)


def test_oip_a_long_datatype_is_cut_to_40_characters():
    with refused(InvalidInput, f"inputs[0].datatype {'X' * 40!r} is not one of {OIP_TYPES}"):
        oip.message_input(infer_request("X" * 50, (1, 2)), SPEC, 4)


@pytest.mark.parametrize("shape", [[6], [1, 3, 2], [1, 2, 3, 1], [1, 2], [-1, 2, 3]])
def test_oip_shape_refusals(shape):
    with refused(InvalidInput, f"inputs[0].shape must be [rows, 2, 3], got {shape}"):
        oip.message_input(infer_request("FP32", shape), SPEC23, 4)


def test_oip_shape_refusal_shows_ten_dimensions():
    with refused(InvalidInput, f"inputs[0].shape must be [rows, 2], got {[1] * 10}"):
        oip.message_input(infer_request("FP32", [1] * 12), SPEC, 4)


def test_oip_row_count_refusals():
    with refused(InvalidInput, "inputs[0] has 0 rows: send at least one"):
        oip.message_input(infer_request("FP32", (0, 2)), SPEC, 4)
    with refused(PayloadTooLarge, "inputs[0] has 5 rows; at most 4 are allowed per request"):
        oip.message_input(infer_request("FP32", (5, 2), "fp32_contents", [0.0] * 10), SPEC, 4)


def test_oip_raw_contents_refusals():
    four = np.zeros(4, dtype="<f4").tobytes()
    with refused(InvalidInput, "raw_input_contents holds 2 tensors; one input was sent"):
        oip.message_input(infer_request("FP32", (2, 2), raw=[four, four]), SPEC, 4)
    with refused(InvalidInput, "raw_input_contents[0] has 15 bytes; shape [2, 2] of FP32 needs 16"):
        oip.message_input(infer_request("FP32", (2, 2), raw=[four[:-1]]), SPEC, 4)
    with refused(InvalidInput, "raw_input_contents[0] has 16 bytes; shape [2, 2] of FP64 needs 32"):
        oip.message_input(infer_request("FP64", (2, 2), raw=[four]), SPEC, 4)


def test_oip_typed_contents_refusals():
    with refused(InvalidInput, "inputs[0].contents holds 3 values in fp32_contents; shape [2, 2] of FP32 needs 4"):
        oip.message_input(infer_request("FP32", (2, 2), "fp32_contents", [1.0, 2.0, 3.0]), SPEC, 4)
    # no broadcast of one value in this protocol
    with refused(InvalidInput, "inputs[0].contents holds 1 values in int64_contents; shape [2, 2] of INT64 "
                               "needs 4"):
        oip.message_input(infer_request("INT64", (2, 2), "int64_contents", [1]), SPEC, 4)
    # values in another type's field are not read
    with refused(InvalidInput, "inputs[0].contents holds 0 values in fp32_contents; shape [2, 2] of FP32 needs 4"):
        oip.message_input(infer_request("FP32", (2, 2), "fp64_contents", [1.0, 2.0, 3.0, 4.0]), SPEC, 4)


def test_oip_values_the_spec_cannot_hold_are_refused():
    with refused(InvalidInput, "'inputs[0]' holds a non-finite number in row 1 (NaN, infinity, or beyond "
                               "the range of float32)"):
        oip.message_input(infer_request("FP32", (2, 2), "fp32_contents", [1.0, 2.0, 3.0, float("nan")]), SPEC, 4)
    with refused(InvalidInput, "'inputs[0]' must hold whole numbers for input dtype int32"):
        oip.message_input(infer_request("FP32", (1, 2), "fp32_contents", [1.0, 2.5]),
                          InputSpec(shape=(2,), dtype="int32"), 4)
    with refused(InvalidInput, "'inputs[0]' holds -1 outside the range of input dtype uint8 [0, 255]"):
        oip.message_input(infer_request("INT32", (1, 2), "int_contents", [-1, 1]),
                          InputSpec(shape=(2,), dtype="uint8"), 4)


# -- message_outputs, version_of -----------------------------------------------------------------

def test_oip_no_outputs_asked_is_probabilities_raw_as_the_input():
    assert oip.message_outputs(infer_request("FP32", (1, 2), "fp32_contents", [1.0, 2.0])) == \
        [("probabilities", False)]
    assert oip.message_outputs(infer_request("FP32", (1, 2), raw=[b"\0" * 8])) == [("probabilities", True)]


def test_oip_outputs_asked_for_each_with_binary_data():
    outputs = [("members", None), ("entropy", True), ("abstain", False), ("probabilities", None)]
    request = infer_request("FP32", (1, 2), "fp32_contents", [1.0, 2.0], outputs=outputs)
    assert oip.message_outputs(request) == [("members", False), ("entropy", True), ("abstain", False),
                                            ("probabilities", False)]
    raw = infer_request("FP32", (1, 2), raw=[b"\0" * 8], outputs=outputs)
    assert oip.message_outputs(raw) == [("members", True), ("entropy", True), ("abstain", True),
                                        ("probabilities", True)]


def test_oip_every_output_name_is_known():
    request = infer_request(outputs=[(name, None) for name in oip.OUTPUTS])
    assert oip.message_outputs(request) == [(name, False) for name in
                                            ("probabilities", "members", *SCORE_NAMES, "abstain")]


def test_oip_unknown_outputs_are_refused():
    with refused(InvalidInput, f"unknown output 'predictions'; this model has {OIP_OUTPUTS}"):
        oip.message_outputs(infer_request(outputs=[("entropy", None), ("predictions", None)]))
    with refused(InvalidInput, f"unknown output {'o' * 100!r}; this model has {OIP_OUTPUTS}"):
        oip.message_outputs(infer_request(outputs=[("o" * 150, None)]))


def test_oip_version_of():
    assert oip.version_of("") is None
    assert oip.version_of("12") == "12"
    assert oip.version_of("0") == "0"
    for text in ("1a", "-1", " 1", "١٢", "1.0"):  # "١٢": digits, not ASCII ones
        with refused(ModelNotFound, f"version {text!r} is not a version number"):
            oip.version_of(text)
    with refused(ModelNotFound, f"version {'9' * 19 + 'x'!r} is not a version number"):
        oip.version_of("9" * 19 + "x" + "9" * 10)


# -- output, infer_response ----------------------------------------------------------------------

def test_oip_output_of_each_name():
    a = answer()
    np.testing.assert_array_equal(oip.output("probabilities", a), COMBINED)
    np.testing.assert_array_equal(oip.output("members", a), MEMBERS)
    for name, values in EXPECTED_SCORES.items():
        np.testing.assert_array_equal(oip.output(name, a), np.array(values, dtype=np.float32))
    abstain = oip.output("abstain", a)
    assert abstain.dtype == np.bool_
    np.testing.assert_array_equal(abstain, [True, False])


def test_oip_abstain_without_a_threshold_is_refused():
    with refused(InvalidInput, "digits version 3 has no abstention threshold (its manifest has none); "
                               "ask for the uncertainty scores instead"):
        oip.output("abstain", answer(abstains=False))


EVERY_OUTPUT = {  # name: (datatype, shape, contents field, values)
    "probabilities": ("FP32", [2, 3], "fp32_contents", COMBINED.reshape(-1)),
    "members": ("FP32", [2, 2, 3], "fp32_contents", MEMBERS.reshape(-1)),
    **{name: ("FP32", [2], "fp32_contents", np.array(v, np.float32)) for name, v in EXPECTED_SCORES.items()},
    "abstain": ("BOOL", [2], "bool_contents", np.array([True, False])),
}


def test_oip_infer_response_typed_contents(pb):
    reply = oip.infer_response(answer(), "req-1", [(name, False) for name in EVERY_OUTPUT])
    assert isinstance(reply, pb.ModelInferResponse)
    assert (reply.model_name, reply.model_version, reply.id) == ("digits", "3", "req-1")
    assert [o.name for o in reply.outputs] == list(EVERY_OUTPUT)
    assert list(reply.raw_output_contents) == []
    for tensor in reply.outputs:
        datatype, shape, field, values = EVERY_OUTPUT[tensor.name]
        assert (tensor.datatype, list(tensor.shape)) == (datatype, shape), tensor.name
        assert [f.name for f, _ in tensor.contents.ListFields()] == [field], tensor.name
        np.testing.assert_array_equal(np.array(getattr(tensor.contents, field), dtype=values.dtype), values)


def test_oip_infer_response_raw_for_every_output_when_one_is_raw(pb):
    # a big-endian array in the answer still goes out little-endian
    a = answer(combined=COMBINED.astype(">f4"))
    outputs = [("probabilities", False), ("members", False), ("entropy", True), ("abstain", False)]
    reply = oip.infer_response(a, "", outputs)
    assert (reply.model_name, reply.model_version, reply.id) == ("digits", "3", "")
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("probabilities", "FP32", [2, 3]), ("members", "FP32", [2, 2, 3]), ("entropy", "FP32", [2]),
        ("abstain", "BOOL", [2])]
    assert all(not o.HasField("contents") for o in reply.outputs)
    assert list(reply.raw_output_contents) == [
        COMBINED.astype("<f4").tobytes(), MEMBERS.astype("<f4").tobytes(),
        np.array([0.9, 0.3], dtype="<f4").tobytes(), b"\x01\x00"]


def test_oip_infer_response_of_probabilities_only(pb):
    reply = oip.infer_response(answer(), "x", [("probabilities", False)])
    assert [o.name for o in reply.outputs] == ["probabilities"]
    np.testing.assert_array_equal(np.array(reply.outputs[0].contents.fp32_contents, np.float32),
                                  COMBINED.reshape(-1))


def test_oip_infer_response_refuses_abstain_without_a_threshold(pb):
    with refused(InvalidInput, "digits version 3 has no abstention threshold (its manifest has none); "
                               "ask for the uncertainty scores instead"):
        oip.infer_response(answer(abstains=False), "x", [("probabilities", False), ("abstain", False)])


# -- metadata_response ---------------------------------------------------------------------------

def _tensors(tensors):
    return [(t.name, t.datatype, list(t.shape)) for t in tensors]


V2_OUTPUTS = [("probabilities", "FP32", [-1, 3]), ("members", "FP32", [-1, 2, 3]),
              ("entropy", "FP32", [-1]), ("expected_entropy", "FP32", [-1]), ("mutual_information", "FP32", [-1])]


def test_oip_metadata_response(pb):
    reply = oip.metadata_response(ensemble())
    assert isinstance(reply, pb.ModelMetadataResponse)
    assert (reply.name, list(reply.versions), reply.platform) == ("digits", ["3"], "tensorflow_savedmodel_ensemble")
    assert _tensors(reply.inputs) == [("instances", "FP32", [-1, 2])]
    assert _tensors(reply.outputs) == V2_OUTPUTS


@pytest.mark.parametrize("dtype, datatype", [("uint8", "UINT8"), ("int64", "INT64"), ("float64", "FP64")])
def test_oip_metadata_response_with_abstention(pb, dtype, datatype):
    reply = oip.metadata_response(ensemble(ABSTENTION, shape=(2, 3), dtype=dtype))
    assert _tensors(reply.inputs) == [("instances", datatype, [-1, 2, 3])]
    assert _tensors(reply.outputs) == [*V2_OUTPUTS, ("abstain", "BOOL", [-1])]


# == TensorFlow Serving ==========================================================================

TFS_TYPES = ("DT_FLOAT, DT_DOUBLE, DT_HALF, DT_INT8, DT_INT16, DT_INT32, DT_INT64, DT_UINT8, DT_UINT16, "
             "DT_UINT32, DT_UINT64, DT_BOOL")
TFS_OUTPUTS = ["predictions", "labels", "members", "disagreement", *SCORE_NAMES]
WHERE = "inputs['instances']"
STATE = m.ModelVersionStatus.State
CODE = m.POOL.FindEnumTypeByName("tensorflow.error.Code")


def dt(name: str) -> int:
    return m.DataType.values_by_name[name].number


def dt_name(number: int) -> str:
    return m.DataType.values_by_number[number].name


def dims(proto) -> list[int]:
    return [d.size for d in proto.tensor_shape.dim]


def model_spec(name="digits", version=None, label=None, signature=""):
    spec = m.ModelSpec(name=name, signature_name=signature)
    if version is not None:
        spec.version.value = version
    if label is not None:
        spec.version_label = label
    return spec


def predict_request(dtype="DT_FLOAT", shape=(2, 2), field=None, values=(), content=None):
    request = m.PredictRequest(model_spec=model_spec())
    tensor = request.inputs["instances"]
    tensor.dtype = dt(dtype) if isinstance(dtype, str) else dtype
    for d in shape:
        tensor.tensor_shape.dim.add(size=d)
    if field is not None:
        getattr(tensor, field).extend(values)
    if content is not None:
        tensor.tensor_content = content
    return request


# -- model_version, required_name, model_of ------------------------------------------------------

def test_tfs_model_version():
    assert tfs.model_version(model_spec()) is None
    assert tfs.model_version(model_spec(version=7)) == "7"
    assert tfs.model_version(model_spec(version=1)) == "1"


@pytest.mark.parametrize("version", [0, -3])
def test_tfs_model_version_that_cannot_be_one(version):
    with refused(ModelNotFound, f"version {version} of 'digits' does not exist"):
        tfs.model_version(model_spec(version=version))
    with refused(ModelNotFound, f"version {version} of {'n' * 64!r} does not exist"):
        tfs.model_version(model_spec("n" * 80, version=version))


def test_tfs_model_version_label_is_refused():
    with refused(ModelNotFound, "version label 'stable': this server has no version labels; name a version "
                                "number, or none for the live version"):
        tfs.model_version(model_spec(label="stable"))
    with refused(ModelNotFound, f"version label {'l' * 40!r}: this server has no version labels; name a "
                                "version number, or none for the live version"):
        tfs.model_version(model_spec(label="l" * 50))


def test_tfs_required_name():
    assert tfs.required_name(model_spec("digits")) == "digits"
    with refused(InvalidInput, "model_spec.name is empty: name the model"):
        tfs.required_name(model_spec(""))


def test_tfs_model_of():
    assert tfs.model_of(model_spec()) == ("digits", None)
    assert tfs.model_of(model_spec(version=2, signature="serving_default")) == ("digits", "2")
    with refused(InvalidInput, "model_spec.name is empty: name the model"):
        tfs.model_of(model_spec("", version=2))
    with refused(InvalidInput, "signature 'predict' not found; the model's one signature is 'serving_default'"):
        tfs.model_of(model_spec(signature="predict"))
    with refused(InvalidInput, f"signature {'s' * 64!r} not found; the model's one signature is "
                               "'serving_default'"):
        tfs.model_of(model_spec(signature="s" * 70))
    with refused(ModelNotFound, "version 0 of 'digits' does not exist"):
        tfs.model_of(model_spec(version=0))


# -- message_input -------------------------------------------------------------------------------

CONTENT = [  # dtype, little-endian numpy dtype, four values (negative ones where the type has them)
    ("DT_FLOAT", "<f4", [1.5, -2.25, 0.0, 1e6]),
    ("DT_DOUBLE", "<f8", [0.1, -1e300, 2.0, 3.0]),
    ("DT_HALF", "<f2", [1.5, -2.0, 0.0, 65504.0]),
    ("DT_INT8", "i1", [-128, 127, 0, 1]),
    ("DT_INT16", "<i2", [-32768, 32767, 1000, -1000]),
    ("DT_INT32", "<i4", [-2**31, 2**31 - 1, 0, 7]),
    ("DT_INT64", "<i8", [-2**53, 2**53, 0, 7]),
    ("DT_UINT8", "u1", [0, 255, 1, 2]),
    ("DT_UINT16", "<u2", [65535, 0, 1, 2]),
    ("DT_UINT32", "<u4", [4_000_000_000, 0, 1, 2]),
    ("DT_UINT64", "<u8", [2**63, 0, 1, 2]),
    ("DT_BOOL", "?", [True, False, True, True]),
]


@pytest.mark.parametrize("dtype, little_endian, values", CONTENT)
def test_tfs_tensor_content_of_each_dtype(dtype, little_endian, values):
    content = np.array(values, dtype=little_endian).tobytes()
    x = tfs.message_input(predict_request(dtype, (2, 2), content=content), SPEC64, 4)
    assert x.dtype == np.float64 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, np.array(values, dtype=np.float64).reshape(2, 2))


TYPED = [  # dtype, field, four values
    ("DT_FLOAT", "float_val", [1.5, -2.25, 0.0, 1e6]),
    ("DT_DOUBLE", "double_val", [0.1, -1e300, 2.0, 3.0]),
    ("DT_INT8", "int_val", [-128, 127, 0, 1]),
    ("DT_INT16", "int_val", [-32768, 32767, 1000, -1000]),
    ("DT_INT32", "int_val", [-2**31, 2**31 - 1, 0, 7]),
    ("DT_INT64", "int64_val", [-2**53, 2**53, 0, 7]),
    ("DT_UINT8", "int_val", [0, 255, 1, 2]),
    ("DT_UINT16", "int_val", [65535, 0, 1, 2]),
    ("DT_UINT32", "uint32_val", [4_000_000_000, 0, 1, 2]),
    ("DT_UINT64", "uint64_val", [2**63, 0, 1, 2]),
    ("DT_BOOL", "bool_val", [True, False, True, True]),
]


@pytest.mark.parametrize("dtype, field, values", TYPED)
def test_tfs_typed_field_of_each_dtype(dtype, field, values):
    x = tfs.message_input(predict_request(dtype, (2, 2), field, values), SPEC64, 4)
    assert x.dtype == np.float64 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, np.array(values, dtype=np.float64).reshape(2, 2))


def test_tfs_half_val_holds_float16_bit_patterns():
    bits = [0x3E00, 0xC000, 0x0000, 0x7BFF]  # 1.5, -2.0, 0.0, 65504.0
    x = tfs.message_input(predict_request("DT_HALF", (2, 2), "half_val", bits), SPEC64, 4)
    np.testing.assert_array_equal(x, [[1.5, -2.0], [0.0, 65504.0]])
    one = tfs.message_input(predict_request("DT_HALF", (2, 2), "half_val", [0x3E00]), SPEC, 4)
    assert one.dtype == np.float32
    np.testing.assert_array_equal(one, np.full((2, 2), 1.5, dtype=np.float32))


@pytest.mark.parametrize("dtype, field, value", [
    ("DT_FLOAT", "float_val", 2.5), ("DT_INT8", "int_val", -7), ("DT_INT64", "int64_val", 2**40),
    ("DT_BOOL", "bool_val", True), ("DT_DOUBLE", "double_val", 0.1),
])
def test_tfs_one_value_fills_the_shape(dtype, field, value):
    x = tfs.message_input(predict_request(dtype, (3, 2), field, [value]), SPEC64, 4)
    assert x.shape == (3, 2) and x.flags.c_contiguous and x.flags.writeable
    np.testing.assert_array_equal(x, np.full((3, 2), float(value)))


def test_tfs_one_row_one_value():
    x = tfs.message_input(predict_request("DT_FLOAT", (1, 1), "float_val", [4.0]), InputSpec(shape=(1,)), 1)
    np.testing.assert_array_equal(x, [[4.0]])


def test_tfs_tensor_content_wins_over_typed_values():
    content = np.array([1.0, 2.0], dtype="<f4").tobytes()
    x = tfs.message_input(predict_request("DT_FLOAT", (1, 2), "float_val", [7.0, 8.0], content), SPEC, 4)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[1.0, 2.0]])


def test_tfs_values_cast_to_an_integer_spec():
    x = tfs.message_input(predict_request("DT_INT64", (1, 2), "int64_val", [-5, 2**40]),
                          InputSpec(shape=(2,), dtype="int64"), 4)
    assert x.dtype == np.int64
    np.testing.assert_array_equal(x, [[-5, 2**40]])


def test_tfs_input_names_refusals():
    message = "inputs must hold exactly one tensor, 'instances' (the signature's input); got "
    with refused(InvalidInput, message + "none"):
        tfs.message_input(m.PredictRequest(), SPEC, 4)
    wrong = m.PredictRequest()
    wrong.inputs["x"].CopyFrom(predict_request("DT_FLOAT", (1, 2), "float_val", [1.0, 2.0]).inputs["instances"])
    with refused(InvalidInput, message + "'x'"):
        tfs.message_input(wrong, SPEC, 4)
    both = predict_request("DT_FLOAT", (1, 2), "float_val", [1.0, 2.0])
    both.inputs["x"].dtype = dt("DT_FLOAT")
    with refused(InvalidInput, message + ", ".join(repr(k) for k in both.inputs)):
        tfs.message_input(both, SPEC, 4)
    assert set(both.inputs) == {"instances", "x"}
    many = m.PredictRequest()
    for key in ("a" * 50, "b", "c", "d", "e", "f", "g"):
        many.inputs[key].dtype = dt("DT_FLOAT")
    shown = ", ".join(repr(k[:40]) for k in list(many.inputs)[:5])
    assert len(shown.split(", ")) == 5 and ("a" * 41) not in shown
    with refused(InvalidInput, message + shown):
        tfs.message_input(many, SPEC, 4)


@pytest.mark.parametrize("dtype, shown", [
    ("DT_STRING", "DT_STRING"), ("DT_INVALID", "DT_INVALID"), ("DT_COMPLEX64", "DT_COMPLEX64"),
    ("DT_BFLOAT16", "DT_BFLOAT16"), (101, "101"), (999, "999"),
])
def test_tfs_dtypes_refused(dtype, shown):
    with refused(InvalidInput, f"{WHERE}.dtype {shown} is not one of {TFS_TYPES}"):
        tfs.message_input(predict_request(dtype, (1, 2), content=b"\0" * 8), SPEC, 4)


def test_tfs_unknown_rank_is_refused():
    request = predict_request("DT_FLOAT", (1, 2), "float_val", [1.0, 2.0])
    request.inputs["instances"].tensor_shape.unknown_rank = True
    with refused(InvalidInput, f"{WHERE}.tensor_shape has an unknown rank; send the tensor's shape"):
        tfs.message_input(request, SPEC, 4)


@pytest.mark.parametrize("shape", [[6], [1, 3, 2], [1, 2, 3, 1], [1, 2], [-1, 2, 3], []])
def test_tfs_shape_refusals(shape):
    with refused(InvalidInput, f"{WHERE}.shape must be [rows, 2, 3], got {shape}"):
        tfs.message_input(predict_request("DT_FLOAT", shape, "float_val", [1.0]), SPEC23, 4)


def test_tfs_row_count_refusals():
    with refused(InvalidInput, f"{WHERE} has 0 rows: send at least one"):
        tfs.message_input(predict_request("DT_FLOAT", (0, 2), "float_val", [1.0]), SPEC, 4)
    with refused(PayloadTooLarge, f"{WHERE} has 5 rows; at most 4 are allowed per request"):
        tfs.message_input(predict_request("DT_FLOAT", (5, 2), "float_val", [1.0]), SPEC, 4)
    x = tfs.message_input(predict_request("DT_FLOAT", (4, 2), "float_val", [1.0]), SPEC, 4)
    assert x.shape == (4, 2)


def test_tfs_tensor_content_byte_count_refusals():
    with refused(InvalidInput, f"{WHERE}.tensor_content has 15 bytes; shape [2, 2] of DT_FLOAT needs 16"):
        tfs.message_input(predict_request("DT_FLOAT", (2, 2), content=b"\0" * 15), SPEC, 4)
    with refused(InvalidInput, f"{WHERE}.tensor_content has 16 bytes; shape [2, 2] of DT_DOUBLE needs 32"):
        tfs.message_input(predict_request("DT_DOUBLE", (2, 2), content=b"\0" * 16), SPEC, 4)
    with refused(InvalidInput, f"{WHERE}.tensor_content has 16 bytes; shape [2, 2] of DT_HALF needs 8"):
        tfs.message_input(predict_request("DT_HALF", (2, 2), content=b"\0" * 16), SPEC, 4)


def test_tfs_typed_value_count_refusals():
    with refused(InvalidInput, f"{WHERE}.float_val holds 3 values; shape [2, 2] needs 4 (or one, which fills it)"):
        tfs.message_input(predict_request("DT_FLOAT", (2, 2), "float_val", [1.0, 2.0, 3.0]), SPEC, 4)
    with refused(InvalidInput, f"{WHERE}.float_val holds 0 values; shape [2, 2] needs 4 (or one, which fills it)"):
        tfs.message_input(predict_request("DT_FLOAT", (2, 2)), SPEC, 4)
    # values in another type's field are not read
    with refused(InvalidInput, f"{WHERE}.int64_val holds 0 values; shape [1, 2] needs 2 (or one, which fills it)"):
        tfs.message_input(predict_request("DT_INT64", (1, 2), "int_val", [1, 2]), SPEC, 4)
    with refused(InvalidInput, f"{WHERE}.half_val holds 2 values; shape [2, 2] needs 4 (or one, which fills it)"):
        tfs.message_input(predict_request("DT_HALF", (2, 2), "half_val", [0, 0]), SPEC, 4)


@pytest.mark.parametrize("dtype, value, limits", [
    ("DT_UINT8", 256, "uint8 [0, 255]"), ("DT_UINT8", -1, "uint8 [0, 255]"),
    ("DT_INT8", 128, "int8 [-128, 127]"), ("DT_INT8", -129, "int8 [-128, 127]"),
    ("DT_INT16", 32768, "int16 [-32768, 32767]"), ("DT_INT16", -32769, "int16 [-32768, 32767]"),
    ("DT_UINT16", 65536, "uint16 [0, 65535]"), ("DT_UINT16", -1, "uint16 [0, 65535]"),
])
def test_tfs_int_val_outside_a_narrower_type_is_refused(dtype, value, limits):
    message = f"'{WHERE}.int_val' holds {value} outside the range of input dtype {limits}"
    with refused(InvalidInput, message):
        tfs.message_input(predict_request(dtype, (1, 2), "int_val", [0, value]), SPEC, 4)
    with refused(InvalidInput, message):  # one value, checked before it fills the shape
        tfs.message_input(predict_request(dtype, (1, 2), "int_val", [value]), SPEC, 4)


@pytest.mark.parametrize("value", [-1, 65536, 2**31 - 1])
def test_tfs_half_val_outside_16_bits_is_refused(value):
    with refused(InvalidInput, f"'{WHERE}.half_val' holds {value} outside the range of input dtype uint16 "
                               "[0, 65535]"):
        tfs.message_input(predict_request("DT_HALF", (1, 2), "half_val", [0, value]), SPEC, 4)


def test_tfs_values_the_spec_cannot_hold_are_refused():
    with refused(InvalidInput, f"'{WHERE}' holds 1099511627776 outside the range of input dtype int32 "
                               "[-2147483648, 2147483647]"):
        tfs.message_input(predict_request("DT_INT64", (1, 2), "int64_val", [1, 2**40]),
                          InputSpec(shape=(2,), dtype="int32"), 4)
    with refused(InvalidInput, f"'{WHERE}' holds a non-finite number in row 1 (NaN, infinity, or beyond the "
                               "range of float32)"):
        tfs.message_input(predict_request("DT_FLOAT", (2, 2), "float_val", [1.0, 2.0, float("inf"), 4.0]),
                          SPEC, 4)
    with refused(InvalidInput, f"'{WHERE}' holds a non-finite number in row 0 (NaN, infinity, or beyond the "
                               "range of float32)"):
        tfs.message_input(predict_request("DT_DOUBLE", (1, 2), "double_val", [1.0, 1e300]), SPEC, 4)
    with refused(InvalidInput, f"'{WHERE}' must hold whole numbers for input dtype uint8"):
        tfs.message_input(predict_request("DT_FLOAT", (1, 2), "float_val", [0.5]),
                          InputSpec(shape=(2,), dtype="uint8"), 4)


# -- wanted --------------------------------------------------------------------------------------

def test_tfs_wanted_is_every_output_without_a_filter():
    assert tfs.wanted(m.PredictRequest(), ensemble()) == TFS_OUTPUTS
    assert tfs.wanted(m.PredictRequest(), ensemble(ABSTENTION)) == [*TFS_OUTPUTS, "abstain"]


def test_tfs_wanted_is_the_filter_each_once_in_its_order():
    request = m.PredictRequest(output_filter=["members", "predictions", "members", "abstain", "labels"])
    assert tfs.wanted(request, ensemble(ABSTENTION)) == ["members", "predictions", "abstain", "labels"]
    assert tfs.wanted(m.PredictRequest(output_filter=["entropy"]), ensemble()) == ["entropy"]


def test_tfs_wanted_refuses_an_output_not_in_the_signature():
    outputs = ", ".join(TFS_OUTPUTS)
    with refused(InvalidInput, f"output 'abstain' is not in signature 'serving_default'; its outputs are {outputs}"):
        tfs.wanted(m.PredictRequest(output_filter=["predictions", "abstain"]), ensemble())
    with refused(InvalidInput, f"output {'p' * 100!r} is not in signature 'serving_default'; its outputs are "
                               f"{outputs}, abstain"):
        tfs.wanted(m.PredictRequest(output_filter=["p" * 120]), ensemble(ABSTENTION))
    with refused(InvalidInput, f"output 'probabilities' is not in signature 'serving_default'; its outputs are "
                               f"{outputs}"):
        tfs.wanted(m.PredictRequest(output_filter=["probabilities"]), ensemble())


# -- tensor_proto --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, little_endian, values", CONTENT)
def test_tfs_tensor_proto_of_each_numeric_dtype(dtype, little_endian, values):
    array = np.array(values, dtype=little_endian).reshape(2, 2)
    proto = tfs.tensor_proto(array)
    assert (dt_name(proto.dtype), dims(proto)) == (dtype, [2, 2])
    assert proto.tensor_content == array.tobytes()
    assert [f.name for f, _ in proto.ListFields()] == ["dtype", "tensor_shape", "tensor_content"]


def test_tfs_tensor_proto_is_little_endian_and_contiguous():
    array = np.arange(6, dtype=">f8").reshape(2, 3)
    proto = tfs.tensor_proto(array.T)
    assert (dt_name(proto.dtype), dims(proto)) == ("DT_DOUBLE", [3, 2])
    assert proto.tensor_content == np.ascontiguousarray(array.T, dtype="<f8").tobytes()
    assert np.frombuffer(proto.tensor_content, "<f8").tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


@pytest.mark.parametrize("array", [np.array([["a", "é"], ["bc", ""]]),
                                   np.array([["a", "é"], ["bc", ""]], dtype=object)])
def test_tfs_tensor_proto_of_strings(array):
    proto = tfs.tensor_proto(array)
    assert (dt_name(proto.dtype), dims(proto)) == ("DT_STRING", [2, 2])
    assert list(proto.string_val) == [b"a", "é".encode(), b"bc", b""]
    assert proto.tensor_content == b""


# -- signature_def, version_status ---------------------------------------------------------------

def _infos(infos) -> dict[str, tuple[str, str, list[int]]]:
    return {key: (info.name, dt_name(info.dtype), dims(info)) for key, info in infos.items()}


SIGNATURE_OUTPUTS = {
    "predictions": ("predictions:0", "DT_FLOAT", [-1, 3]), "labels": ("labels:0", "DT_STRING", [-1]),
    "members": ("members:0", "DT_FLOAT", [-1, 2, 3]), "disagreement": ("disagreement:0", "DT_FLOAT", [-1]),
    **{score: (f"{score}:0", "DT_FLOAT", [-1]) for score in SCORE_NAMES},
}


def test_tfs_signature_def():
    signature = tfs.signature_def(ensemble())
    assert signature.method_name == "tensorflow/serving/predict"
    assert _infos(signature.inputs) == {"instances": ("instances:0", "DT_FLOAT", [-1, 2])}
    assert _infos(signature.outputs) == SIGNATURE_OUTPUTS


@pytest.mark.parametrize("dtype, name", [("uint8", "DT_UINT8"), ("int64", "DT_INT64"), ("float64", "DT_DOUBLE"),
                                         ("int32", "DT_INT32")])
def test_tfs_signature_def_with_abstention(dtype, name):
    signature = tfs.signature_def(ensemble(ABSTENTION, shape=(2, 3), dtype=dtype))
    assert _infos(signature.inputs) == {"instances": ("instances:0", name, [-1, 2, 3])}
    assert _infos(signature.outputs) == {**SIGNATURE_OUTPUTS, "abstain": ("abstain:0", "DT_BOOL", [-1])}


@pytest.mark.parametrize("entry, state, code, message", [
    ({"state": "live"}, "AVAILABLE", "OK", ""),
    ({"state": "previous"}, "AVAILABLE", "OK", ""),
    ({"state": "loading"}, "LOADING", "OK", ""),
    ({"state": "uncommitted"}, "START", "OK", "being published (uncommitted)"),
    ({"state": "failed", "category": "integrity"}, "END", "UNKNOWN", "failed its checks (integrity)"),
    ({"state": "failed"}, "END", "UNKNOWN", "failed its checks (unknown)"),
    ({"state": "committed"}, "END", "OK", ""),
    ({"state": "retired", "category": "integrity"}, "END", "OK", ""),
])
def test_tfs_version_status_of_each_state(entry, state, code, message):
    status = tfs.version_status({"version": 7, **entry})
    assert status.version == 7
    assert STATE.Name(status.state) == state
    assert CODE.values_by_number[status.status.error_code].name == code
    assert status.status.error_message == message
    assert status.HasField("status") == bool(message)


# -- predict_response ----------------------------------------------------------------------------

DECODE = {"DT_FLOAT": "<f4", "DT_DOUBLE": "<f8", "DT_BOOL": "?"}
PREDICTED = {  # name: (dtype, shape, values)
    "predictions": ("DT_FLOAT", [2, 3], COMBINED),
    "members": ("DT_FLOAT", [2, 2, 3], MEMBERS),
    "disagreement": ("DT_FLOAT", [2], np.array([0.5, 0.0], np.float32)),
    **{name: ("DT_FLOAT", [2], np.array(v, np.float32)) for name, v in EXPECTED_SCORES.items()},
    "abstain": ("DT_BOOL", [2], np.array([True, False])),
}


def decoded(proto) -> np.ndarray:
    return np.frombuffer(proto.tensor_content, DECODE[dt_name(proto.dtype)]).reshape(dims(proto))


def test_tfs_predict_response_of_every_output():
    reply = tfs.predict_response(answer(), ensemble(ABSTENTION), [*TFS_OUTPUTS, "abstain"])
    spec = reply.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == ("digits", 3, "serving_default")
    assert set(reply.outputs) == {*TFS_OUTPUTS, "abstain"}
    labels = reply.outputs["labels"]
    assert (dt_name(labels.dtype), dims(labels), list(labels.string_val)) == ("DT_STRING", [2], [b"b", b"a"])
    for name, (dtype, shape, values) in PREDICTED.items():
        proto = reply.outputs[name]
        assert (dt_name(proto.dtype), dims(proto)) == (dtype, shape), name
        np.testing.assert_array_equal(decoded(proto), values, err_msg=name)


def test_tfs_predict_response_of_some_outputs():
    reply = tfs.predict_response(answer(abstains=False), ensemble(), ["mutual_information", "labels"])
    assert set(reply.outputs) == {"mutual_information", "labels"}
    np.testing.assert_array_equal(decoded(reply.outputs["mutual_information"]), np.array([0.5, 0.1], np.float32))
    assert list(reply.outputs["labels"].string_val) == [b"b", b"a"]
    assert list(tfs.predict_response(answer(), ensemble(), []).outputs) == []


def test_tfs_predict_response_refuses_abstain_without_a_threshold():
    with refused(InvalidInput, "digits version 3 has no abstention threshold (its manifest has none); "
                               "ask for the uncertainty scores instead"):
        tfs.predict_response(answer(abstains=False), ensemble(), ["predictions", "abstain"])


# -- metadata_response, status_response ----------------------------------------------------------

def test_tfs_metadata_response():
    e = ensemble(ABSTENTION)
    reply = tfs.metadata_response(e, ["signature_def"])
    spec = reply.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == ("digits", 3, "")
    assert list(reply.metadata) == ["signature_def"]
    packed = reply.metadata["signature_def"]
    assert packed.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    signatures = m.SignatureDefMap.FromString(packed.value)
    assert list(signatures.signature_def) == ["serving_default"]
    signature = signatures.signature_def["serving_default"]
    assert signature == tfs.signature_def(e)
    assert signature.method_name == "tensorflow/serving/predict" and "abstain" in signature.outputs
    assert tfs.metadata_response(e, ["signature_def", "signature_def"]) == reply


def test_tfs_metadata_response_refusals():
    with refused(InvalidInput, "metadata_field is empty: ask for 'signature_def'"):
        tfs.metadata_response(ensemble(), [])
    with refused(InvalidInput, "metadata field 'signature' is not supported; the one there is is 'signature_def'"):
        tfs.metadata_response(ensemble(), ["signature"])
    with refused(InvalidInput, "metadata field 'x' is not supported; the one there is is 'signature_def'"):
        tfs.metadata_response(ensemble(), ["signature_def", "x"])
    with refused(InvalidInput, f"metadata field {'f' * 40!r} is not supported; the one there is is "
                               "'signature_def'"):
        tfs.metadata_response(ensemble(), ["f" * 45])


ENTRIES = [{"version": 1, "state": "previous"}, {"version": 2, "state": "live"},
           {"version": 3, "state": "failed", "category": "integrity"}, {"version": 4, "state": "loading"}]


def _statuses(reply) -> list[tuple[int, str, str]]:
    return [(s.version, STATE.Name(s.state), s.status.error_message) for s in reply.model_version_status]


def test_tfs_status_response_of_every_version():
    reply = tfs.status_response(ENTRIES, model_spec())
    assert _statuses(reply) == [(1, "AVAILABLE", ""), (2, "AVAILABLE", ""),
                                (3, "END", "failed its checks (integrity)"), (4, "LOADING", "")]
    assert list(reply.model_version_status) == [tfs.version_status(e) for e in ENTRIES]
    assert _statuses(tfs.status_response([], model_spec())) == []


def test_tfs_status_response_of_one_version():
    assert _statuses(tfs.status_response(ENTRIES, model_spec(version=3))) == [
        (3, "END", "failed its checks (integrity)")]
    assert _statuses(tfs.status_response(ENTRIES, model_spec(version=1))) == [(1, "AVAILABLE", "")]


def test_tfs_status_response_refusals():
    with refused(ModelNotFound, "version 5 of 'digits' is not in the repository"):
        tfs.status_response(ENTRIES, model_spec(version=5))
    with refused(ModelNotFound, "version 0 of 'digits' does not exist"):
        tfs.status_response(ENTRIES, model_spec(version=0))
    with refused(ModelNotFound, "version label 'canary': this server has no version labels; name a version "
                                "number, or none for the live version"):
        tfs.status_response(ENTRIES, model_spec(label="canary"))
    with refused(InvalidInput, "model_spec.name is empty: name the model"):
        tfs.status_response(ENTRIES, model_spec("", version=2))


# == Two bugs this file found: a narrower integer type's contents, disagreement's dtype ==========

@pytest.mark.parametrize("datatype, field, value", [("INT8", "int_contents", 300), ("UINT8", "uint_contents", 256),
                                                    ("INT16", "int_contents", -40000),
                                                    ("UINT16", "uint_contents", 70000)])
def test_oip_typed_contents_outside_a_narrower_type_are_refused(datatype, field, value):
    with pytest.raises(InvalidInput, match=rf"^'inputs\[0\]\.contents' holds {value} outside the range of input "
                                         rf"dtype {datatype.lower()} "):
        oip.message_input(infer_request(datatype, (1, 2), field, [0, value]), SPEC, 4)


def test_tfs_disagreement_has_the_signature_dtype():
    e = ensemble()
    sent = tfs.predict_response(answer(), e, ["disagreement"]).outputs["disagreement"].dtype
    assert dt_name(sent) == dt_name(tfs.signature_def(e).outputs["disagreement"].dtype)
