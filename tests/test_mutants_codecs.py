"""Tests written for mutants of the codecs group that survived the mutation run (`make mutation`,
docs/development.md#mutation-testing), or that no test of the group reached: each pins a
behaviour of the protocol codecs, the answer or the HTTP handlers over them that no other test
checked. In process, against hand-made answers and fake data planes; no TensorFlow."""

from __future__ import annotations

import asyncio
import re
import warnings
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from contract.manifest import HeadSpec, InputSpec, Signature, TensorSpec
from service.answer import Answer, Head, combined_head
from service.errors import InvalidInput, PayloadTooLarge
from service.protocols import predict as rows
from service.protocols import tfs
from service.protocols import tfs_messages as m
from service.protocols.arrays import booleans, strings, to_spec

COMBINED = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=np.float32)
MEMBERS = np.array([[[0.1, 0.7, 0.2], [0.3, 0.3, 0.4]], [[0.5, 0.2, 0.3], [0.7, 0.0, 0.3]]], dtype=np.float32)
SCORES = np.array([[0.9, 0.4, 0.5, 1.0], [0.3, 0.2, 0.1, 0.0]], dtype=np.float32)


def refused(exc: type[Exception], message: str):
    """pytest.raises for exactly `message` (the whole of it)."""
    return pytest.raises(exc, match=rf"^{re.escape(message)}$")


def format_1_answer() -> Answer:
    """digits/3's answer for two rows, built as an engine's three arrays become one."""
    manifest = SimpleNamespace(format_version=1, name="digits", version=3,
                               output=SimpleNamespace(classes=("a", "b", "c")), abstention=None)
    return Answer.of(manifest, (COMBINED, MEMBERS, SCORES), ("m0", "m1"))


# -- service/answer.py -------------------------------------------------------------------------

def test_a_format_1_answer_is_one_head_called_probabilities_with_the_members_names():
    answer = format_1_answer()
    assert list(answer.heads) == ["probabilities"] and answer.head.name == "probabilities"
    assert answer.member_names == ("m0", "m1") and answer.format_version == 1
    assert (answer.name, answer.version, answer.rows) == ("digits", 3, 2)


def test_a_format_2_head_keeps_its_name():
    spec = HeadSpec(name="price", task="regression", labels=("p",))
    assert combined_head(spec, np.array([[[1.0], [3.0]]]), None, [0.5, 0.5]).name == "price"


def test_an_interval_width_rule_reads_the_width_not_the_sum_of_the_bounds():
    spec = HeadSpec(name="price", task="regression", labels=("price",),
                    abstention={"score": "interval_width", "threshold": 3.0, "level": 0.9})
    # row 0: mean 10.1, width 2 x 1.645 x 0.1 = 0.33 (its bounds sum to 20.2); row 1: width 6.58
    head = combined_head(spec, np.array([[[10.0], [10.2]], [[0.0], [4.0]]]), None, [0.5, 0.5])
    assert head.abstain().tolist() == [False, True]


def test_a_row_exactly_at_the_threshold_does_not_abstain():
    spec = HeadSpec(name="price", task="regression", labels=("price",),
                    abstention={"score": "interval_width", "threshold": 0.0, "level": 0.9})
    # row 0: members agree, width exactly 0.0; row 1: they do not
    head = combined_head(spec, np.array([[[2.0], [2.0]], [[1.0], [3.0]]]), None, [0.5, 0.5])
    assert head.abstain().tolist() == [False, True]


def test_a_rule_on_a_classification_score_of_one_value_per_row():
    spec = HeadSpec(name="kind", task="classification", labels=("a", "b"),
                    abstention={"score": "entropy", "threshold": 0.5})
    # entropies 0.33 and ln 2 = 0.69 nats
    head = combined_head(spec, np.array([[[0.9, 0.1], [0.9, 0.1]], [[0.5, 0.5], [0.5, 0.5]]]), None, [0.5, 0.5])
    assert head.abstain().tolist() == [False, True]


# -- service/protocols/arrays.py ---------------------------------------------------------------

def test_a_cast_that_overflows_is_refused_without_a_numpy_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in cast" would raise here
        with refused(InvalidInput, "'instances' holds a non-finite number in row 1 "
                                   "(NaN, infinity, or beyond the range of float32)"):
            to_spec(np.array([[1.0, 2.0], [1e39, 0.0]]), InputSpec(shape=(2,)), "instances")


@pytest.mark.parametrize("values, found", [(["a", 1], "int"), ([["a", True]], "bool"), ([["a", 1.5]], "float")])
def test_strings_refuse_a_number_or_boolean_beside_a_string(values, found):
    # numpy would turn them into text ("1", "True") if the values were not kept as objects
    with refused(InvalidInput, f"'f' must hold strings (or {{\"b64\": \"...\"}}); found {found}"):
        strings(values, "f")


def test_ragged_booleans_are_refused_naming_the_field():
    with refused(InvalidInput, "'f' is ragged or mixes types: it must be nested lists of true/false"):
        booleans([[True], [True, False]], "f")


# -- service/protocols/predict.py --------------------------------------------------------------

def test_answer_body_without_options_is_the_probabilities_labels_classes_and_model():
    body = rows.answer_body(format_1_answer(), False)
    assert list(body) == ["predictions", "labels", "classes", "model"]
    assert body["labels"] == ["b", "a"] and body["model"] == {"name": "digits", "version": 3}
    assert list(rows.answer_body(format_1_answer(), True)) == ["outputs", "labels", "classes", "model"]


TWO = Signature(inputs=(TensorSpec(name="a", dtype="float32", shape=(1,)), TensorSpec(name="b", dtype="float32", shape=(1,))),
                heads=(HeadSpec(name="kind", task="classification", labels=("x", "y")),))
ONE = Signature(inputs=(TensorSpec(name="x", dtype="float32", shape=(1,)),),
                heads=(HeadSpec(name="kind", task="classification", labels=("x", "y")),))


def decode(payload, signature, max_rows=4):
    return rows.decode_named(orjson.dumps(payload), signature, max_rows, 1000)


def test_named_rows_and_columns_up_to_the_limit_are_taken_and_one_more_is_refused():
    x, _ = decode({"instances": [{"a": [1], "b": [2]}] * 2}, TWO, max_rows=2)
    assert x["a"].tolist() == [[1.0], [1.0]] and x["b"].tolist() == [[2.0], [2.0]]
    x, _ = decode({"inputs": {"a": [[1], [2]], "b": [[3], [4]]}}, TWO, max_rows=2)
    assert x["a"].tolist() == [[1.0], [2.0]] and x["b"].tolist() == [[3.0], [4.0]]
    with refused(PayloadTooLarge, "'instances' has 3 rows; at most 2 are allowed per request"):
        decode({"instances": [{"a": [1], "b": [2]}] * 3}, TWO, max_rows=2)
    with refused(PayloadTooLarge, "'inputs.a' has 3 rows; at most 2 are allowed per request"):
        decode({"inputs": {"a": [[1]] * 3, "b": [[2]] * 3}}, TWO, max_rows=2)


def test_a_non_finite_named_value_is_refused_naming_its_field_and_row():
    tail = "holds a non-finite number in row 1 (NaN, infinity, or beyond the range of float32)"
    with refused(InvalidInput, f"'inputs.a' {tail}"):
        decode({"inputs": {"a": [[1.0], [1e39]], "b": [[1.0], [2.0]]}}, TWO)
    with refused(InvalidInput, f"'instances[*].b' {tail}"):
        decode({"instances": [{"a": [1], "b": [1]}, {"a": [1], "b": [1e39]}]}, TWO)
    with refused(InvalidInput, f"'instances' {tail}"):  # one input: the rows are its values
        decode({"instances": [[1.0], [1e39]]}, ONE)
    with refused(InvalidInput, f"'inputs.x' {tail}"):
        decode({"inputs": [[1.0], [1e39]]}, ONE)


def test_a_named_row_of_the_wrong_shape_shows_its_shape():
    with refused(InvalidInput, "'inputs.x': each row of input 'x' must have shape [1], got [2]"):
        decode({"inputs": [[1, 2]]}, ONE)  # rows of one dimension: their shape, not "a single value"
    with refused(InvalidInput, "'inputs.x': each row of input 'x' must have shape [1], got [1, 2]"):
        decode({"inputs": [[[1, 2]]]}, ONE)


def test_a_version_of_one_string_input_takes_a_row_that_reads_like_its_name():
    signature = Signature(inputs=(TensorSpec(name="text", dtype="string", shape=(1,)),),
                          heads=(HeadSpec(name="kind", task="classification", labels=("x", "y")),))
    x, columnar = decode({"instances": [["text"], ["other"]]}, signature)
    assert not columnar and x["text"].tolist() == [[b"text"], [b"other"]]


def test_wrong_input_names_are_listed_cut_and_joined():
    where = "'instances'[0] must name exactly the inputs ['a', 'b']: "
    with refused(InvalidInput, where + "missing ['b']; unknown ['c']"):
        decode({"instances": [{"a": [1], "c": [2]}]}, TWO)
    long = "n" * 70
    with refused(InvalidInput, where + f"unknown ['{'n' * 64}']"):
        decode({"instances": [{"a": [1], "b": [2], long: 1}]}, TWO)
    extra = {f"e{i}": 0 for i in range(6)}
    with refused(InvalidInput, where + "unknown ['e0', 'e1', 'e2', 'e3', 'e4']"):
        decode({"instances": [{"a": [1], "b": [2], **extra}]}, TWO)


def head(name: str, task: str, labels: tuple[str, ...], combined: list) -> Head:
    value = np.array(combined)
    return Head(name, task, labels, value, value[:, None, :], {})


def test_two_heads_asked_in_columns_are_an_object_by_head():
    kind = head("kind", "classification", ("a", "b"), [[0.9, 0.1]])
    spam = head("spam", "binary", ("ham", "spam"), [[0.2]])
    body = rows.named_answer_body(Answer("shop", 4, ("m0",), {"kind": kind, "spam": spam}, 2), True)
    assert list(body["outputs"]) == ["kind", "spam"]
    np.testing.assert_array_equal(body["outputs"]["spam"], [[0.2]])


def test_a_probability_of_exactly_one_half_says_yes():
    spam = head("spam", "binary", ("ham", "spam"), [[0.5], [0.25]])
    tags = head("tags", "multilabel", ("x", "y"), [[0.5, 0.25], [0.75, 0.5]])
    heads = rows.named_answer_body(Answer("shop", 4, ("m0",), {"spam": spam, "tags": tags}, 2), False)["heads"]
    assert heads["spam"]["predicted"] == ["spam", "ham"]
    assert heads["tags"]["predicted"] == [["x"], ["x", "y"]]


def test_a_long_interval_level_is_cut_to_20_characters_in_the_refusal():
    with refused(InvalidInput, "interval must be a level between 0 and 1 (e.g. 0.9), got '12345678901234567890'"):
        rows.level("12345678901234567890123")


# -- service/protocols/tfs.py ------------------------------------------------------------------

def test_tfs_a_long_input_name_is_cut_to_40_characters():
    request = m.PredictRequest()
    request.inputs["a" * 50].dtype = m.DataType.values_by_name["DT_FLOAT"].number
    with refused(InvalidInput, "inputs must hold exactly one tensor, 'instances' (the signature's input); "
                               f"got '{'a' * 40}'"):
        tfs.message_input(request, InputSpec(shape=(2,)), 4)


def test_tfs_uint64_values_above_the_int64_range_keep_every_digit():
    # Read as numpy likes, 2**64 - 1 beside a small value becomes a float64 (2**64), which the
    # cast to uint64 then wraps to 0; read as uint64 it stays itself.
    request = m.PredictRequest()
    tensor = request.inputs["instances"]
    tensor.dtype = m.DataType.values_by_name["DT_UINT64"].number
    for d in (1, 2):
        tensor.tensor_shape.dim.add(size=d)
    tensor.uint64_val.extend([2**64 - 1, 1])
    assert tfs.message_input(request, InputSpec(shape=(2,), dtype="float64"), 4).tolist() == [[2.0**64, 1.0]]
    with refused(InvalidInput, "'inputs['instances']' holds 18446744073709551615 outside the range of input dtype "
                               "int64 [-9223372036854775808, 9223372036854775807]"):
        tfs.message_input(request, InputSpec(shape=(2,), dtype="int64"), 4)


# -- service/edge/rest.py and service/edge/v2.py -----------------------------------------------

def plane_of(answer: Answer, seen: dict) -> SimpleNamespace:
    """A data plane that answers `answer` and records what it was asked."""
    async def infer(ensemble, x, deadline, *hold):
        seen.update(ensemble=ensemble, x=x, deadline=deadline)
        return answer

    def ensemble(name, version):
        seen["asked"] = (name, version)
        return seen["served"]

    return SimpleNamespace(settings=SimpleNamespace(max_rows_per_request=4, request_timeout_ms=5),
                           json_value_limit=lambda e: 100, infer=infer, ensemble=ensemble)


def test_the_row_handler_infers_with_the_ensemble_it_was_given_in_both_formats():
    from service.edge.rest import _rows

    named = SimpleNamespace(manifest=SimpleNamespace(format_version=2), signature=ONE)
    answer = Answer("shop", 4, ("m0",), {"kind": head("kind", "classification", ("a", "b"), [[0.9, 0.1]])}, 2)
    seen: dict = {}
    call = SimpleNamespace(body=orjson.dumps({"instances": [[0.5]]}), query={}, deadline=lambda ms: ms / 1000,
                           hold=None)
    reply = asyncio.run(_rows(call, plane_of(answer, seen), named))
    assert reply.status == 200 and seen["ensemble"] is named and seen["deadline"] == 0.005
    assert seen["x"]["x"].tolist() == [[0.5]] and orjson.loads(reply.body)["model"] == {"name": "shop", "version": 4}
    plain = SimpleNamespace(manifest=SimpleNamespace(format_version=1), input_spec=InputSpec(shape=(1,)))
    call.body = orjson.dumps({"instances": [[0.5], [0.25]]})
    reply = asyncio.run(_rows(call, plane_of(format_1_answer(), seen), plain))
    assert reply.status == 200 and seen["ensemble"] is plain and seen["x"].tolist() == [[0.5], [0.25]]
    assert orjson.loads(reply.body)["labels"] == ["b", "a"]


def test_v2_infer_passes_the_requests_deadline_and_answers_its_id():
    from service.edge.v2 import v2_infer

    seen: dict = {"served": SimpleNamespace(name="digits", version=3, input_spec=InputSpec(shape=(2,)),
                                            manifest=SimpleNamespace(format_version=1))}
    body = {"id": "r1", "inputs": [{"name": "instances", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    call = SimpleNamespace(params={"name": "digits"}, body=orjson.dumps(body), headers={},
                           deadline=lambda ms: 100.0 + ms, hold=None)
    reply = asyncio.run(v2_infer(call, plane_of(format_1_answer(), seen)))
    assert seen["asked"] == ("digits", None) and seen["ensemble"] is seen["served"]
    assert seen["deadline"] == 105.0 and seen["x"].tolist() == [[1, 2], [3, 4]]
    assert reply.status == 200 and reply.headers == []
    answered = orjson.loads(reply.body)
    assert {k: answered[k] for k in ("model_name", "model_version", "id")} == {
        "model_name": "digits", "model_version": "3", "id": "r1"}
    assert [(o["name"], o["shape"], o["datatype"]) for o in answered["outputs"]] == [("probabilities", [2, 3], "FP32")]
    np.testing.assert_array_equal(np.array(answered["outputs"][0]["data"], np.float32), COMBINED.reshape(-1))


def test_v2_model_readiness_asks_the_manager_for_that_name_and_version():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.edge.v2 import register

    asked = []

    def get(name, version=None):
        asked.append((name, version))

    app = FastAPI()
    register(app, SimpleNamespace(manager=SimpleNamespace(get=get)))
    with TestClient(app) as client:
        reply = client.get("/v2/models/digits/versions/3/ready")
        assert (reply.status_code, reply.json()) == (200, {"name": "digits", "ready": True})
        reply = client.get("/v2/models/shop/ready")
        assert (reply.status_code, reply.json()) == (200, {"name": "shop", "ready": True})
    assert asked == [("digits", 3), ("shop", None)]
