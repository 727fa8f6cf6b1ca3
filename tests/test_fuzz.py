"""Property-based fuzzing (Hypothesis) of every wire format's decoder and of a running service:
arbitrary bytes, arbitrary JSON, and near-valid requests with one part mutated. Whatever comes
in, the answer is a 2xx or a 4xx naming the problem: never an escaped exception, never a 500.
(schemathesis fuzzes the OpenAPI schema separately: tests/test_reload.py.)"""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.protocols import oip as v2
from service.protocols import predict as rest
from service.errors import ServiceError
from contract.manifest import InputSpec
from tests.server import ServerProcess

SPECS = [InputSpec(shape=(8, 8, 1)), InputSpec(shape=(3,), dtype="uint8"), InputSpec(shape=(2, 2), dtype="int32"),
         InputSpec(shape=(4,), dtype="float64")]
MAX_ROWS, MAX_VALUES = 16, 4096
DECODER_EXAMPLES, SERVICE_EXAMPLES = 600, 300

def dump(value) -> bytes:
    """JSON of any value, integers past 64 bits included (orjson refuses to write those)."""
    return json.dumps(value).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)
# Numbers JSON can hold that a model may not: huge, negative, fractional, NaN spelled out.
odd_numbers = st.sampled_from([0, -1, 255, 256, 2 ** 31, 2 ** 63, -(2 ** 63) - 1, 1e308, -1e-320, 0.5, True, None, "1"])


def valid_rest(spec: InputSpec, rows: int) -> dict:
    return {"instances": np.zeros((rows, *spec.shape), dtype=int).tolist()}


def valid_v2(spec: InputSpec, rows: int) -> dict:
    return {"id": "x", "inputs": [{"name": "instances", "shape": [rows, *spec.shape],
                                   "datatype": v2.datatype(spec.dtype),
                                   "data": [0] * (rows * int(np.prod(spec.shape)))}],
            "outputs": [{"name": "probabilities"}], "parameters": {"binary_data_output": False}}


@st.composite
def mutated(draw, valid) -> bytes:
    """A valid request of some spec with one part replaced, removed, or given an odd value."""
    spec, rows = draw(st.sampled_from(SPECS)), draw(st.integers(1, 3))
    body = valid(spec, rows)
    paths: list[tuple] = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                walk(v, (*path, i))

    walk(body, ())
    path = draw(st.sampled_from(paths[1:]))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "odd", "remove"]))
    if action == "remove":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values if action == "replace" else odd_numbers)
    return dump(body)


def decoded_or_refused(decode) -> None:
    """Run a decoder: it must return, or raise a ServiceError with a 4xx status."""
    try:
        decode()
    except ServiceError as exc:
        assert 400 <= exc.status < 500, (type(exc), exc)


def both_decoders(body: bytes, spec: InputSpec, header: str | None = None) -> None:
    decoded_or_refused(lambda: rest.decode(body, spec, MAX_ROWS, MAX_VALUES))
    decoded_or_refused(lambda: v2.decode(body, header, spec, MAX_ROWS, MAX_VALUES))


any_body = st.one_of(
    st.binary(max_size=300),
    json_values.map(dump),
    st.builds(lambda v: dump({"instances": v}), json_values),
    st.builds(lambda v: dump({"inputs": v}), json_values),
    mutated(valid_rest),
    mutated(valid_v2),
)


@settings(max_examples=DECODER_EXAMPLES, deadline=None)
@given(body=any_body, spec=st.sampled_from(SPECS),
       header=st.none() | st.text(max_size=6) | st.integers(0, 400).map(str))
def test_decoders_answer_every_body_with_rows_or_a_4xx(body, spec, header):
    both_decoders(body, spec, header)


@settings(max_examples=DECODER_EXAMPLES // 2, deadline=None)
@given(spec=st.sampled_from(SPECS), rows=st.integers(1, 3), datatype=st.sampled_from(sorted(v2.DATATYPES)),
       declared=st.integers(-2, 2), tail=st.binary(max_size=40), data=st.data())
def test_binary_v2_bodies_with_odd_sizes_and_types_are_answered_or_refused(spec, rows, datatype, declared, tail, data):
    shape = data.draw(st.one_of(st.just([rows, *spec.shape]), st.lists(st.integers(0, 5), max_size=4)))
    itemsize = np.dtype(v2.DATATYPES[datatype]).itemsize
    size = int(np.prod(shape)) * itemsize + declared
    head = orjson.dumps({"inputs": [{"name": "instances", "shape": shape, "datatype": datatype,
                                     "parameters": {"binary_data_size": size}}]})
    raw = data.draw(st.binary(min_size=max(size, 0), max_size=max(size, 0))) + tail
    decoded_or_refused(lambda: v2.decode(head + raw, str(len(head)), spec, MAX_ROWS, MAX_VALUES))


@pytest.fixture(scope="module")
def served(trained_repository):
    server = ServerProcess(trained_repository).start()
    yield server
    server.kill()


ROUTES = ["/predict", "/v1/models/digits:predict", "/v1/models/digits/versions/1:predict",
          "/v2/models/digits/infer", "/v2/models/digits/versions/1/infer"]


@settings(max_examples=SERVICE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=any_body,
       header=st.none() | st.sampled_from(["0", "5", "99999999999999999999", "-1", "x", "\u0661", "9" * 50]),
       query=st.sampled_from(["", "?members=true", "?members=%ff", "?members=1&members=0", "?=&&"]))
def test_a_running_service_answers_every_body_with_a_2xx_or_a_4xx(served, route, body, header, query):
    headers = {"content-type": "application/json"}
    if header is not None:
        headers["inference-header-content-length"] = header.encode()
    resp = served.client.post(route + query, content=body, headers=headers)
    assert resp.status_code < 500, (resp.status_code, resp.text, body[:200])
    if resp.status_code >= 400:
        assert resp.json()["error"]


def test_the_fuzzed_service_logged_no_traceback(served):
    assert "Traceback" not in served.output()
