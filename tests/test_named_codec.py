"""The row codec's half for format-2 versions (service.protocols.predict: decode_named,
named_tensor, named_answer_body, level) and the string and boolean conversions under it
(service.protocols.arrays), in process, against hand-made signatures and answers: exact arrays,
exact refusals, exact answer bodies. No TensorFlow (tests/test_named.py serves real members)."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from contract import tasks
from contract.manifest import HeadSpec, Signature, TensorSpec
from service.answer import Answer, combine, combined_head
from service.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from service.protocols import predict as rows
from service.protocols.arrays import booleans, numeric, strings

SIGNATURE = Signature(
    inputs=(TensorSpec(name="image", dtype="float32", shape=(2, 2)), TensorSpec(name="note", dtype="string"),
            TensorSpec(name="flags", dtype="bool", shape=(3,)), TensorSpec(name="tokens", dtype="int32", shape=(None,))),
    heads=(HeadSpec(name="kind", task="classification", labels=("a", "b")),))
ONE = Signature(inputs=(TensorSpec(name="review", dtype="string"),),
                heads=(HeadSpec(name="kind", task="classification", labels=("a", "b")),))
ROW = {"image": [[1, 2], [3, 4]], "note": "hi", "flags": [True, False, True], "tokens": [5, 6]}


def decode(payload, signature=SIGNATURE, max_rows=4, max_values=1000):
    return rows.decode_named(orjson.dumps(payload), signature, max_rows, max_values)


def test_rows_naming_every_input_become_one_array_per_input_of_its_dtype():
    x, columnar = decode({"instances": [ROW, dict(ROW, note={"b64": base64.b64encode(b"\x00\xff").decode()},
                                                   tokens=[7, 8])]})
    assert not columnar and list(x) == ["image", "note", "flags", "tokens"]
    assert x["image"].dtype == np.float32 and x["image"].tolist() == [[[1, 2], [3, 4]]] * 2
    assert x["note"].dtype == object and x["note"].tolist() == [b"hi", b"\x00\xff"]
    assert x["flags"].dtype == bool and x["flags"].tolist() == [[True, False, True]] * 2
    assert x["tokens"].dtype == np.int32 and x["tokens"].tolist() == [[5, 6], [7, 8]]


def test_columns_by_input_name_decode_alike_and_say_columnar():
    columns = {name: [value] for name, value in ROW.items()}
    x, columnar = decode({"inputs": columns})
    assert columnar and x["note"].tolist() == [b"hi"] and x["tokens"].tolist() == [[5, 6]]
    # `instances` wins when both are sent, as in the row format of format 1
    x, columnar = decode({"inputs": columns, "instances": [ROW]})
    assert not columnar


def test_a_version_of_one_input_takes_each_rows_value_alone_or_named():
    x, _ = decode({"instances": ["good", "bad"]}, ONE)
    assert x["review"].tolist() == [b"good", b"bad"]
    x, _ = decode({"instances": [{"review": "good"}]}, ONE)
    assert x["review"].tolist() == [b"good"]
    x, columnar = decode({"inputs": ["good"]}, ONE)
    assert columnar and x["review"].tolist() == [b"good"]


@pytest.mark.parametrize("payload, error, message", [
    ({"x": 1}, InvalidInput, "missing field 'instances': send {\"instances\": [{\"input name\": value, ...}, ...]}"),
    ({"instances": []}, InvalidInput, "'instances' must be a non-empty list of rows"),
    ({"instances": {"a": 1}}, InvalidInput, "'instances' must be a non-empty list of rows"),
    ({"instances": [ROW] * 5}, PayloadTooLarge, "'instances' has 5 rows; at most 4 are allowed per request"),
    ({"instances": [1]}, InvalidInput, "'instances'[0] must be an object naming the inputs ['image', 'note', 'flags', 'tokens']"),
    ({"instances": [dict(ROW, extra=1)]}, InvalidInput,
     "'instances'[0] must name exactly the inputs ['image', 'note', 'flags', 'tokens']: unknown ['extra']"),
    ({"instances": [{k: v for k, v in ROW.items() if k != "note"}]}, InvalidInput,
     "'instances'[0] must name exactly the inputs ['image', 'note', 'flags', 'tokens']: missing ['note']"),
    ({"instances": [dict(ROW, image=[[1, 2]])]}, InvalidInput,
     "'instances[*].image': each row of input 'image' must have shape [2, 2], got [1, 2]"),
    ({"instances": [dict(ROW, tokens=7)]}, InvalidInput,
     "'instances[*].tokens': each row of input 'tokens' must have shape [any], got a single value (rows of one "
     "request must share their length)"),
    ({"instances": [dict(ROW, flags=[1, 0, 1])]}, InvalidInput,
     "'instances[*].flags' must hold true or false only; found values of type int64"),
    ({"instances": [dict(ROW, note=3)]}, InvalidInput,
     "'instances[*].note' must hold strings (or {\"b64\": \"...\"}); found int"),
    ({"instances": [dict(ROW, note={"b64": "%%%"})]}, InvalidInput, "'instances[*].note' holds invalid base64 in its 0th value"),
    ({"instances": [dict(ROW, note={"b64": "aGk=", "x": 1})]}, InvalidInput,
     "'instances[*].note' must hold strings (or {\"b64\": \"...\"}); found dict"),
    ({"instances": [dict(ROW, image=[["a", "b"], ["c", "d"]])]}, InvalidInput,
     "'instances[*].image' must hold numbers only; found strings"),
    ({"instances": [dict(ROW, tokens=[1.5, 2])]}, InvalidInput,
     "'instances[*].tokens' must hold whole numbers for input dtype int32"),
    ({"inputs": [1]}, InvalidInput, "'inputs' must be an object naming the inputs ['image', 'note', 'flags', 'tokens']"),
    ({"inputs": {"image": [], "note": [], "flags": [], "tokens": []}}, InvalidInput,
     "'inputs.image' must be a non-empty list of rows"),
    ({"inputs": {name: [value] * 5 for name, value in ROW.items()}}, PayloadTooLarge,
     "'inputs.image' has 5 rows; at most 4 are allowed per request"),
    ({"inputs": {**{name: [value] for name, value in ROW.items()}, "note": ["a", "b"]}}, InvalidInput,
     "the inputs have different numbers of rows: {'image': 1, 'note': 2, 'flags': 1, 'tokens': 1}"),
    ({"inputs": {"image": [ROW["image"]]}}, InvalidInput,
     "'inputs' must name exactly the inputs ['image', 'note', 'flags', 'tokens']: missing ['note', 'flags', 'tokens']"),
])
def test_bad_named_input_is_refused_naming_the_input_and_why(payload, error, message):
    with pytest.raises(error) as raised:
        decode(payload)
    assert str(raised.value) == message


def test_a_body_that_is_not_a_json_object_or_holds_too_many_values_is_refused_before_it_is_read():
    with pytest.raises(MalformedRequest):
        rows.decode_named(b"[1]", SIGNATURE, 4, 1000)
    with pytest.raises(PayloadTooLarge):
        rows.decode_named(orjson.dumps({"instances": [ROW]}), SIGNATURE, 4, 3)


def test_strings_and_booleans_alone():
    assert strings([["a", {"b64": "aGk="}]], "f").tolist() == [[b"a", b"hi"]]
    assert strings([], "f").shape == (0,)
    assert booleans([[True], [False]], "f").tolist() == [[True], [False]]
    with pytest.raises(InvalidInput, match=r"^'f' must hold true or false only; found strings$"):
        booleans(["yes"], "f")


def head_answer(spec: HeadSpec, members: np.ndarray, variances=None) -> Answer:
    head = combined_head(spec, members, variances, [0.5, 0.5])
    return Answer("shop", 4, ("m0", "m1"), {spec.name: head}, 2)


def test_an_answer_of_several_heads_is_one_object_per_row_by_head_with_each_heads_terms():
    kind = combined_head(HeadSpec(name="kind", task="classification", labels=("a", "b")),
                         np.array([[[0.9, 0.1], [0.7, 0.3]], [[0.2, 0.8], [0.4, 0.6]]]), None, [0.5, 0.5])
    tags = combined_head(HeadSpec(name="tags", task="multilabel", labels=("x", "y")),
                         np.array([[[0.9, 0.2], [0.7, 0.4]], [[0.1, 0.6], [0.3, 0.8]]]), None, [0.5, 0.5])
    spam = combined_head(HeadSpec(name="spam", task="binary", labels=("ham", "spam"),
                                  abstention={"score": "mutual_information", "threshold": 0.01}),
                         np.array([[[0.9], [0.9]], [[0.2], [0.9]]]), None, [0.5, 0.5])
    answer = Answer("shop", 4, ("m0", "m1"), {"kind": kind, "tags": tags, "spam": spam}, 2)
    body = orjson.loads(orjson.dumps(rows.named_answer_body(answer, False, members=True, uncertainty=True),
                                     option=orjson.OPT_SERIALIZE_NUMPY))
    assert body["model"] == {"name": "shop", "version": 4}
    assert [set(p) for p in body["predictions"]] == [{"kind", "tags", "spam"}] * 2
    np.testing.assert_allclose([p["kind"] for p in body["predictions"]], [[0.8, 0.2], [0.3, 0.7]])
    np.testing.assert_allclose([p["spam"] for p in body["predictions"]], [[0.9], [0.55]])
    heads = body["heads"]
    assert heads["kind"]["predicted"] == ["a", "b"] and heads["kind"]["labels"] == ["a", "b"]
    assert heads["tags"]["predicted"] == [["x"], ["y"]] and heads["tags"]["task"] == "multilabel"
    assert heads["spam"]["predicted"] == ["spam", "spam"]
    assert heads["spam"]["abstain"] == [False, True]  # the members disagree on row 1 only
    assert "abstain" not in heads["kind"]
    np.testing.assert_allclose(heads["kind"]["members"]["m1"], [[0.7, 0.3], [0.4, 0.6]])
    assert set(heads["spam"]["uncertainty"]) == {"entropy", "expected_entropy", "mutual_information"}
    assert "interval" not in heads["kind"]
    columnar = rows.named_answer_body(answer, True)
    assert set(columnar) == {"outputs", "heads", "model"} and list(columnar["outputs"]) == ["kind", "tags", "spam"]
    plain = rows.named_answer_body(answer, False)
    assert "members" not in plain["heads"]["kind"] and "uncertainty" not in plain["heads"]["kind"]


def test_one_head_is_its_value_alone_and_a_regression_head_gives_its_interval():
    spec = HeadSpec(name="price", task="regression", labels=("price",), variance=True)
    means, variances = np.array([[[1.0], [3.0]]]), np.array([[[0.5], [1.5]]])
    answer = head_answer(spec, means, variances)
    body = rows.named_answer_body(answer, False, interval=0.9)
    np.testing.assert_allclose(body["predictions"], [[2.0]])
    lower, upper = tasks.interval(tasks.regression(means, [0.5, 0.5], 1.0, variances), 0.9)
    assert body["heads"]["price"]["interval"]["level"] == 0.9
    np.testing.assert_allclose(body["heads"]["price"]["interval"]["lower"], lower)
    np.testing.assert_allclose(body["heads"]["price"]["interval"]["upper"], upper)
    assert "predicted" not in body["heads"]["price"]
    np.testing.assert_allclose(rows.named_answer_body(answer, True)["outputs"], [[2.0]])


def test_a_regression_head_abstains_on_its_interval_width():
    spec = HeadSpec(name="price", task="regression", labels=("price",),
                    abstention={"score": "interval_width", "threshold": 3.0, "level": 0.9})
    answer = head_answer(spec, np.array([[[1.0], [1.2]], [[0.0], [4.0]]]))
    assert answer.head.abstain().tolist() == [False, True]  # widths 0.33 and 6.58


def test_the_interval_level_is_a_number_between_0_and_1():
    assert rows.level(None) is None and rows.level("0.9") == 0.9
    for bad in ("0", "1", "x", "-0.5", "nan"):
        with pytest.raises(InvalidInput, match=r"^interval must be a level between 0 and 1 \(e\.g\. 0\.9\), got "):
            rows.level(bad)


def named_manifest():
    """A format-2 manifest of two members: a classification head, then a regression head with a
    variance (its outputs: values, then variances)."""
    from datetime import datetime, timezone

    from contract.manifest import ManifestV2

    members = [{"name": f"m{i}", "path": f"members/m{i}", "kind": "imported", "weight": w,
                "files": {"saved_model.pb": "a" * 64}} for i, w in enumerate((0.25, 0.75))]
    return ManifestV2.model_validate({
        "format_version": 2, "name": "shop", "version": 7, "created": datetime.now(timezone.utc),
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
        "heads": [{"name": "kind", "task": "classification", "labels": ["a", "b"], "temperatures": [2.0]},
                  {"name": "price", "task": "regression", "labels": ["p"], "variance": True, "variance_scale": 3.0}],
        "members": members})


def test_a_format_2_answer_takes_each_heads_arrays_in_order_and_combines_them_by_task():
    manifest = named_manifest()
    kind = np.array([[[0.9, 0.1], [0.3, 0.7]]])
    means, variances = np.array([[[1.0], [5.0]]]), np.array([[[2.0], [4.0]]])
    answer = Answer.of(manifest, combine(manifest, (kind, means, variances)), ("m0", "m1"))
    assert (answer.name, answer.version, answer.member_names, answer.format_version) == ("shop", 7, ("m0", "m1"), 2)
    assert list(answer.heads) == ["kind", "price"] and answer.rows == 1
    want = tasks.classification(kind, [0.25, 0.75], 2.0)
    np.testing.assert_allclose(answer.heads["kind"].combined, want.value)
    assert answer.heads["kind"].task == "classification" and answer.heads["kind"].labels == ("a", "b")
    price = answer.heads["price"]
    want = tasks.regression(means, [0.25, 0.75], 3.0, variances)
    np.testing.assert_allclose(price.combined, want.value)
    np.testing.assert_allclose(price.variance, want.variance)
    np.testing.assert_allclose(price.members, means)
    assert price.abstain() is None


def test_the_row_handler_serves_a_format_2_version_through_the_named_codec():
    import asyncio
    from types import SimpleNamespace

    from service.edge.rest import _rows

    manifest = named_manifest()
    seen = {}

    async def infer(ensemble, x, deadline, hold):
        seen["x"], seen["deadline"], seen["hold"] = x, deadline, hold
        n = len(x["x"])
        return Answer.of(manifest, combine(manifest, (np.tile([[[0.9, 0.1], [0.3, 0.7]]], (n, 1, 1)),
                                                      np.ones((n, 2, 1)), np.ones((n, 2, 1)))), ("m0", "m1"))

    ensemble = SimpleNamespace(manifest=manifest, signature=manifest.signature())
    plane = SimpleNamespace(settings=SimpleNamespace(max_rows_per_request=4, request_timeout_ms=5),
                            json_value_limit=lambda e: 100, infer=infer)
    call = SimpleNamespace(body=orjson.dumps({"instances": [[0.5], [0.25]]}),
                           query={"members": "true", "uncertainty": "1", "interval": "0.5"},
                           deadline=lambda default_ms: 9.0 if default_ms == 5 else None, hold="the call's hold")
    reply = asyncio.run(_rows(call, plane, ensemble))
    assert reply.status == 200 and seen["deadline"] == 9.0 and seen["hold"] == "the call's hold"
    assert seen["x"]["x"].tolist() == [[0.5], [0.25]]
    body = orjson.loads(reply.body)
    assert [set(p) for p in body["predictions"]] == [{"kind", "price"}] * 2
    heads = body["heads"]
    assert set(heads["kind"]) == {"task", "labels", "predicted", "members", "uncertainty"}
    assert heads["price"]["interval"]["level"] == 0.5 and "members" in heads["price"]
    call.body = orjson.dumps({"inputs": {"x": [[0.5]]}})
    call.query = {}
    body = orjson.loads(asyncio.run(_rows(call, plane, ensemble)).body)
    assert set(body) == {"outputs", "heads", "model"} and set(body["heads"]["kind"]) == {"task", "labels", "predicted"}
    call.query = {"interval": "2"}
    with pytest.raises(InvalidInput, match=r"^interval must be a level"):
        asyncio.run(_rows(call, plane, ensemble))


def test_a_batch_is_combined_once_and_each_requests_rows_of_it_are_its_own_answer():
    """service.answer.combine runs on a whole batch; a request's answer reads its rows of each
    array, and equals the answer of its rows combined alone (no row depends on another)."""
    manifest = named_manifest().model_copy(update={"heads": (
        HeadSpec(name="kind", task="classification", labels=("a", "b"), temperatures=(2.0,),
                 abstention={"score": "mutual_information", "threshold": 0.01}),
        HeadSpec(name="price", task="regression", labels=("p",), variance=True, variance_scale=3.0))})
    rng = np.random.default_rng(3)
    kind = rng.dirichlet([1.0, 1.0], size=(4, 2))
    means, variances = rng.normal(size=(4, 2, 1)), rng.uniform(0.1, 1.0, size=(4, 2, 1))
    batch = combine(manifest, (kind, means, variances))
    # per head: value, members, (variance), the task's three scores, (abstained)
    assert [a.shape for a in batch] == [(4, 2), (4, 2, 2), (4,), (4,), (4,), (4,),
                                        (4, 1), (4, 2, 1), (4, 1), (4, 1), (4, 1), (4, 1)]
    part = Answer.of(manifest, tuple(a[1:3] for a in batch), ("m0", "m1"))
    alone = Answer.of(manifest, combine(manifest, (kind[1:3], means[1:3], variances[1:3])), ("m0", "m1"))
    for name in ("kind", "price"):
        got, want = part.heads[name], alone.heads[name]
        np.testing.assert_array_equal(got.combined, want.combined)
        np.testing.assert_array_equal(got.members, want.members)
        for score in want.scores:
            np.testing.assert_array_equal(got.score(score), want.score(score))
    np.testing.assert_array_equal(part.heads["kind"].abstain(), alone.heads["kind"].abstain())
    np.testing.assert_array_equal(part.heads["price"].variance, alone.heads["price"].variance)
    assert part.heads["price"].abstain() is None


# -- nullable inputs: a null is the missing value of an input that takes one --------------------

NULLABLE = Signature(
    inputs=(TensorSpec(name="age", dtype="float32"), TensorSpec(name="sex", dtype="string", nullable=True),
            TensorSpec(name="bmi", dtype="float32", nullable=True),
            TensorSpec(name="labs", dtype="float64", shape=(2,), nullable=True),
            TensorSpec(name="visits", dtype="int32"), TensorSpec(name="smoker", dtype="bool")),
    heads=(HeadSpec(name="risk", task="binary", labels=("low", "high")),))
CSV_ROW = {"age": 41, "sex": "female", "bmi": 22.5, "labs": [1.0, 2.0], "visits": 3, "smoker": False}


def test_a_null_in_a_nullable_input_is_nan_in_a_float_and_the_empty_string_in_a_string():
    x, columnar = decode({"instances": [dict(CSV_ROW, bmi=None), dict(CSV_ROW, sex=None, labs=[None, 4.0]),
                                        dict(CSV_ROW, labs=[None, None])]}, NULLABLE)
    assert not columnar
    assert x["bmi"].dtype == np.float32 and np.isnan(x["bmi"][0]) and x["bmi"][1:].tolist() == [22.5, 22.5]
    assert x["sex"].dtype == object and x["sex"].tolist() == [b"female", b"", b"female"]
    assert x["labs"].dtype == np.float64 and x["labs"].shape == (3, 2)
    assert np.isnan(x["labs"]).tolist() == [[False, False], [True, False], [True, True]]
    assert x["labs"][:2, 1].tolist() == [2.0, 4.0]
    assert x["age"].tolist() == [41.0] * 3 and x["visits"].tolist() == [3] * 3  # the others as ever


def test_a_null_in_a_nullable_column_is_its_missing_value_too():
    columns = {name: [value, value] for name, value in CSV_ROW.items()}
    x, columnar = decode({"inputs": dict(columns, bmi=[None, 30], sex=["male", None], labs=[[1, None], [2, 3]])},
                         NULLABLE)
    assert columnar
    assert np.isnan(x["bmi"]).tolist() == [True, False] and x["bmi"][1] == 30.0 and x["bmi"].dtype == np.float32
    assert x["sex"].tolist() == [b"male", b""]
    assert np.isnan(x["labs"]).tolist() == [[False, True], [False, False]]
    x, _ = decode({"inputs": dict(columns, bmi=[None, None])}, NULLABLE)
    assert np.isnan(x["bmi"]).all() and x["bmi"].shape == (2,)


def test_a_version_of_one_nullable_input_takes_a_bare_null_row():
    one = Signature(inputs=(TensorSpec(name="bmi", dtype="float32", nullable=True),), heads=NULLABLE.heads)
    x, _ = decode({"instances": [None, 20.5]}, one)
    assert np.isnan(x["bmi"][0]) and x["bmi"][1] == 20.5


NO_MISSING = "(a missing value); input {!r} does not take missing values"


@pytest.mark.parametrize("row, message", [
    (dict(CSV_ROW, age=None), "'instances[*].age' holds null " + NO_MISSING.format("age")),
    (dict(CSV_ROW, visits=None), "'instances[*].visits' holds null " + NO_MISSING.format("visits")),
    (dict(CSV_ROW, smoker=None), "'instances[*].smoker' holds null " + NO_MISSING.format("smoker")),
    (dict(CSV_ROW, bmi=1e39), "'instances[*].bmi' holds infinity in row 1 (or a number beyond the range of float32); "
                              "input 'bmi' takes NaN as its missing value, not infinity"),
    (dict(CSV_ROW, bmi="22.5"), "'instances[*].bmi' must hold numbers only; found strings"),
    (dict(CSV_ROW, labs=[None, True]), "'instances[*].labs' must hold numbers only; found null or mixed values"),
    (dict(CSV_ROW, labs=None), "'instances[*].labs' is ragged or mixes types: it must be nested lists of numbers"),
    (dict(CSV_ROW, sex=3), "'instances[*].sex' must hold strings (or {\"b64\": \"...\"}); found int"),
])
def test_a_null_where_no_missing_value_is_taken_or_infinity_anywhere_is_refused(row, message):
    with pytest.raises(InvalidInput) as raised:
        decode({"instances": [CSV_ROW, row]}, NULLABLE)
    assert str(raised.value) == message


def test_a_null_in_a_string_input_that_is_not_nullable_is_refused_saying_so():
    with pytest.raises(InvalidInput) as raised:
        decode({"inputs": {"review": ["good", None]}}, ONE)
    assert str(raised.value) == "'inputs.review' holds null (a missing value); input 'review' does not take missing values"


def test_strings_numbers_and_booleans_alone_with_and_without_a_spec():
    nullable, plain = TensorSpec(name="s", dtype="string", nullable=True), TensorSpec(name="s", dtype="string")
    assert strings([["a", None]], "f", nullable).tolist() == [[b"a", b""]]
    with pytest.raises(InvalidInput, match=r"^'f' must hold strings \(or \{\"b64\": \"...\"\}\); found NoneType$"):
        strings(["a", None], "f")  # no spec: format 1's codecs, which have no string input
    with pytest.raises(InvalidInput, match=r"^'f' holds null \(a missing value\); input 's' does not take missing values$"):
        strings(["a", None], "f", plain)
    with pytest.raises(InvalidInput, match=r"^'f' must hold numbers only; found null or mixed values$"):
        numeric([1.0, None], "f")
    bmi = TensorSpec(name="bmi", dtype="float64", nullable=True)
    got = numeric([[1, None]], "f", spec=bmi)
    assert got.dtype == np.float64 and got.shape == (1, 2) and got[0, 0] == 1.0 and np.isnan(got[0, 1])
    assert numeric([1, 2], "f", spec=bmi).dtype == np.int64  # no null: numpy's own conversion, untouched
    with pytest.raises(InvalidInput, match=r"^'f' holds an integer beyond the range of float64$"):
        numeric([None, 10**400], "f", spec=bmi)
    with pytest.raises(InvalidInput, match=r"^'f' must hold numbers only; found null or mixed values$"):
        numeric([2**70], "f", spec=bmi)  # a number numpy keeps as an object, with no null: as before
    flag = TensorSpec(name="flag", dtype="bool")
    with pytest.raises(InvalidInput, match=r"^'f' holds null \(a missing value\); input 'flag' does not take "):
        booleans([True, None], "f", flag)
    with pytest.raises(InvalidInput, match=r"^'f' must hold true or false only; found null or mixed values$"):
        booleans([True, None], "f")
