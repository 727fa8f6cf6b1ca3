"""Turning request bodies into arrays: every kind of bad input gets a clear 4xx (no TF)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.protocols.arrays import parse_json_object
from service.protocols.predict import instances_to_array, numeric_rows
from service.answer import disagreement
from service.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from contract.manifest import InputSpec, first_nonfinite_row

SPEC = InputSpec(shape=(2, 2, 1))
ROW = [[[1], [2]], [[3], [16]]]


def test_valid_rows_become_float32_of_the_spec_shape():
    x = instances_to_array([ROW, ROW], SPEC, max_rows=10)
    assert x.shape == (2, 2, 2, 1) and x.dtype == np.float32
    assert x[0, 1, 1, 0] == 16.0


@pytest.mark.parametrize(
    "body, error, message",
    [
        (b"", MalformedRequest, "empty"),
        (b"{not json", MalformedRequest, "not valid JSON"),
        (b"[1, 2]", MalformedRequest, "must be a JSON object, got a JSON list"),
    ],
)
def test_unparseable_bodies_are_400(body, error, message):
    with pytest.raises(error, match=message):
        parse_json_object(body, 10**6)


@pytest.mark.parametrize(
    "instances, message",
    [
        (None, "missing field 'instances'"),
        ({"a": 1}, "must be a list of instances, got a JSON dict"),
        ([], "is empty"),
        ([[1, 2, 3, 4]], r"shape \[2, 2, 1\], got \[4\]"),
        ([1.0], r"got a bare number"),
        ([ROW, [[[1], [2]]]], "ragged"),
        ([[[["a"], [2]], [[3], [4]]]], "numbers only; found strings"),
        ([[[[True], [False]], [[True], [True]]]], "found true/false"),
        ([[[[None], [2]], [[3], [4]]]], "found null"),
        ([ROW, [[[1], [2]], [[3], [1e39]]]], "non-finite number in instance 1"),
    ],
)
def test_bad_instances_are_422_naming_the_problem(instances, message):
    with pytest.raises(InvalidInput, match=message):
        instances_to_array(instances, SPEC, max_rows=10)


def test_first_nonfinite_row_even_when_finite_values_overflow_the_sum():
    huge = np.full((3, 4), 1e308)  # finite, but their sum is not: the row check decides
    assert first_nonfinite_row(huge) is None
    huge[2, 1] = np.nan
    assert first_nonfinite_row(huge) == 2
    small = np.ones((4, 2), np.float32)
    assert first_nonfinite_row(small) is None
    small[1, 0] = -np.inf
    assert first_nonfinite_row(small) == 1
    assert first_nonfinite_row(np.ones((2, 2), np.int64)) is None


def test_too_many_rows_is_413():
    with pytest.raises(PayloadTooLarge, match="at most 2"):
        instances_to_array([ROW] * 3, SPEC, max_rows=2)


def test_integer_inputs_refuse_fractions():
    spec = InputSpec(shape=(2,), dtype="int32")
    assert instances_to_array([[1, 2]], spec, 5).dtype == np.int32
    with pytest.raises(InvalidInput, match="whole numbers"):
        instances_to_array([[1.5, 2]], spec, 5)


def test_labels_and_disagreement():
    from service.answer import Head

    avg = np.array([[0.6, 0.4], [0.2, 0.8]])
    members = np.array([[[0.9, 0.1], [0.3, 0.7]], [[0.1, 0.9], [0.3, 0.7]]])
    head = Head("probabilities", "classification", ("cat", "dog"), avg, members, {})
    assert head.top_labels() == ["cat", "dog"]
    np.testing.assert_allclose(disagreement(members, avg), [0.5, 0.0])
    np.testing.assert_allclose(head.disagreement(), [0.5, 0.0])


def test_v2_data_for_integer_inputs_refuses_fractions_like_instances_do():
    from service.protocols.oip import input_array as v2_input_array

    spec = InputSpec(shape=(2,), dtype="int32")
    tensor = {"name": "x", "shape": [1, 2], "datatype": "FP32"}
    assert v2_input_array({"inputs": [{**tensor, "data": [1.0, 2.0]}]}, b"", spec, 5).dtype == np.int32
    with pytest.raises(InvalidInput, match="whole numbers"):
        v2_input_array({"inputs": [{**tensor, "data": [1.5, 2.0]}]}, b"", spec, 5)


# -- numeric_rows: the fast path for bodies that are only rows of numbers ---------------------------

def general_path(body: bytes, spec: InputSpec, max_rows: int = 10) -> np.ndarray:
    payload = parse_json_object(body, 10**6)
    field = "instances" if "instances" in payload else "inputs"
    return instances_to_array(payload.get(field), spec, max_rows, field=field)


@pytest.mark.parametrize("shape", [(2, 2, 1), (3,), (1, 4), (8, 8, 1)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numeric_rows_reads_what_the_general_path_reads(shape, dtype):
    rng = np.random.default_rng(7)
    spec = InputSpec(shape=shape, dtype=dtype)
    for rows in (1, 2, 7):
        ints = rng.integers(-20, 20, (rows, *shape)).tolist()
        floats = (rng.standard_normal((rows, *shape)) * 10.0 ** rng.integers(-8, 8, (rows, *shape))).tolist()
        for field in ("instances", "inputs"):
            for values in (ints, floats):
                for option in (0, orjson.OPT_INDENT_2):
                    body = orjson.dumps({field: values}, option=option)
                    got = numeric_rows(body, spec, max_rows=10)
                    assert got is not None, body
                    assert got[0] == field
                    expected = general_path(body, spec)
                    assert got[1].dtype == expected.dtype and got[1].shape == expected.shape
                    np.testing.assert_array_equal(got[1], expected)


@pytest.mark.parametrize("body", [
    b'{ "instances" :[[ [[ 1 ],[2]] , [[3e0],[-4.5E-1]] ]] }\n',
    b'{"instances":[[[[1],[2]],[[3],[4]]]]}',
    b'{"inputs":[[[[-0.0],[1e3]],[[3.25],[0]]], [[[1],[2]],[[3],[4]]]]}',
    b'\t{"instances":\r\n[[[[1],[2]],[[3],[4]]]]}  ',
])
def test_numeric_rows_takes_any_json_spelling_of_numbers_and_space(body):
    got = numeric_rows(body, SPEC, max_rows=10)
    assert got is not None
    np.testing.assert_array_equal(got[1], general_path(body, SPEC))


@pytest.mark.parametrize("body", [
    b'{"instances": [[[[true], [false]], [[true], [true]]]]}',
    b'{"instances": [[[[null], [2]], [[3], [4]]]]}',
    b'{"instances": [[[["1"], [2]], [[3], [4]]]]}',
    b'{"instances": [[[[1], [2]], [[3], [4]]], [[[1], [2]]]]}',  # ragged
    b'{"instances": [[[[1, 2], [2]], [[3], [4]]]]}',  # ragged inside
    b'{"instances": [[1, 2, 3, 4]]}',  # wrong shape
    b'{"instances": [[[[1], [2]], [[3], [4]]]], "signature_name": "x"}',  # more than the rows
    b'{"signature_name": "x", "instances": [[[[1], [2]], [[3], [4]]]]}',
    b'{"instances": []}',
    b'{"instances": [[[[01], [2]], [[3], [4]]]]}',  # not JSON numbers
    b'{"instances": [[[[+1], [2]], [[3], [4]]]]}',
    b'{"instances": [[[[1.], [2]], [[3], [4]]]]}',
    b'{"instances": [[[[1 2], [2]], [[3], [4]]]]}',
    b'{"instances": [[[[NaN], [2]], [[3], [4]]]]}',
    b'{"instances": [[[[1], [2]], [[3], [4]]]]} x',  # trailing garbage
    b'{"instances": [[[[1], [2]], [[3], [4]]]]}}',
    b'{"instances": [[[[1], [2]], [[3], [4]]]',  # truncated
    b'{"\\u0069nstances": [[[[1], [2]], [[3], [4]]]]}',
    b'[[[[1], [2]], [[3], [4]]]]',
])
def test_numeric_rows_leaves_everything_else_to_the_general_path(body):
    assert numeric_rows(body, SPEC, max_rows=10) is None


def test_numeric_rows_leaves_too_many_rows_and_integer_inputs_to_the_general_path():
    body = orjson.dumps({"instances": [ROW] * 11})
    assert numeric_rows(body, SPEC, max_rows=10) is None
    with pytest.raises(PayloadTooLarge):
        general_path(body, SPEC)
    assert numeric_rows(orjson.dumps({"instances": [ROW]}), InputSpec(shape=(2, 2, 1), dtype="int32"), 10) is None


def test_numeric_rows_refuses_non_finite_values_like_the_general_path():
    body = orjson.dumps({"instances": [ROW, [[[1], [2]], [[3], [1e39]]]]})
    with pytest.raises(InvalidInput, match="non-finite number in instance 1"):
        numeric_rows(body, SPEC, max_rows=10)
