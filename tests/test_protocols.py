"""TensorFlow Serving and Open Inference Protocol (V2) routes, JSON and binary, through the app."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from tests.test_api import make_client


@pytest.fixture(scope="module")
def client(trained_repository):
    c, metrics = make_client(trained_repository)
    with c:
        c.metrics = metrics
        yield c


@pytest.fixture(scope="module")
def rows(digits_test_split):
    return digits_test_split.x[:6]


@pytest.fixture(scope="module")
def reference(client, rows):
    return np.array(client.post("/predict", json={"instances": rows.tolist()}).json()["predictions"])


def v2_binary_request(x: np.ndarray, binary_output: bool = True, size=None, header_extra: int = 0):
    header = {"inputs": [{"name": "instances", "shape": list(x.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": size if size is not None else x.nbytes}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": binary_output}}]}
    head = orjson.dumps(header)
    return head + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head) + header_extra)}


def test_tfs_row_and_columnar_formats_and_versioned_path(client, rows, reference):
    row = client.post("/v1/models/digits:predict", json={"instances": rows.tolist()}).json()
    np.testing.assert_allclose(row["predictions"], reference, atol=1e-6)
    col = client.post("/v1/models/digits/versions/1:predict", json={"inputs": rows.tolist()}).json()
    np.testing.assert_allclose(col["outputs"], reference, atol=1e-6)
    named = client.post("/v1/models/digits:predict", json={"inputs": {"instances": rows.tolist()}}).json()
    np.testing.assert_allclose(named["outputs"], reference, atol=1e-6)


def test_unloaded_version_is_404(client, rows):
    resp = client.post("/v1/models/digits/versions/7:predict", json={"instances": rows.tolist()})
    assert resp.status_code == 404 and "version 7 of 'digits' is not loaded (loaded: 1)" in resp.json()["error"]
    assert client.post("/v2/models/digits/versions/7/infer", json={}).status_code == 404


def test_v2_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    meta = client.get("/v2/models/digits").json()
    assert meta["inputs"] == [{"name": "instances", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert client.get("/v2/models/digits/versions/1").json() == meta
    assert client.get("/v2/models/digits/versions/1/ready").json() == {"name": "digits", "ready": True}
    assert client.get("/v2/models/digits/versions/9/ready").status_code == 404
    assert client.get("/v2/models/nope").status_code == 404
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]


def test_v2_json_infer_matches_predict(client, rows, reference):
    body = {"id": "abc", "inputs": [{"name": "instances", "shape": list(rows.shape), "datatype": "FP32",
                                     "data": rows.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}, {"name": "members"}]}
    resp = client.post("/v2/models/digits/infer", json=body).json()
    assert resp["model_name"] == "digits" and resp["model_version"] == "1" and resp["id"] == "abc"
    probs, members = resp["outputs"]
    assert probs["shape"] == [6, 10] and members["shape"] == [6, 5, 10]
    np.testing.assert_allclose(np.reshape(probs["data"], probs["shape"]), reference, atol=1e-6)


def test_v2_binary_in_and_out(client, rows, reference):
    content, headers = v2_binary_request(rows)
    resp = client.post("/v2/models/digits/infer", content=content, headers=headers)
    assert resp.status_code == 200, resp.text
    n = int(resp.headers["inference-header-content-length"])
    header = orjson.loads(resp.content[:n])
    out = header["outputs"][0]
    assert out["parameters"]["binary_data_size"] == 6 * 10 * 4
    np.testing.assert_allclose(np.frombuffer(resp.content[n:], "<f4").reshape(out["shape"]), reference, atol=1e-6)
    content, headers = v2_binary_request(rows, binary_output=False)
    json_out = client.post("/v2/models/digits/infer", content=content, headers=headers).json()
    np.testing.assert_allclose(np.reshape(json_out["outputs"][0]["data"], (6, 10)), reference, atol=1e-6)


@pytest.mark.parametrize(
    "make, status, message",
    [
        (lambda x: v2_binary_request(x, size=x.nbytes - 4), 422, "binary_data_size 508 but shape [2, 8, 8, 1] of FP32 needs 512"),
        (lambda x: v2_binary_request(x, header_extra=10_000), 400, "body has only"),
        (lambda x: (orjson.dumps({"inputs": [{"name": "i", "shape": [0, 8, 8, 1], "datatype": "FP32", "data": []}]}), {}), 422, "0 rows"),
        (lambda x: (orjson.dumps({"inputs": [{"name": "i", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}), {}), 422, "must be [rows, 8, 8, 1]"),
        (lambda x: (orjson.dumps({"inputs": [{"name": "i", "shape": [1, 8, 8, 1], "datatype": "BYTES", "data": ["a"]}]}), {}), 422, "datatype 'BYTES'"),
        (lambda x: (orjson.dumps({"inputs": [{"name": "i", "shape": [2, 8, 8, 1], "datatype": "FP32", "data": [0] * 64}]}), {}), 422, "holds 64 values; shape [2, 8, 8, 1] needs 128"),
        (lambda x: (orjson.dumps({"inputs": []}), {}), 422, "missing field 'inputs'"),
        (lambda x: (orjson.dumps({"inputs": [{"name": "i", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0] * 64}], "outputs": [{"name": "logits"}]}), {}), 422, "unknown output 'logits'"),
    ],
)
def test_v2_bad_requests_are_clear_4xx(client, rows, make, status, message):
    content, headers = make(rows[:2])
    resp = client.post("/v2/models/digits/infer", content=content, headers=headers)
    assert resp.status_code == status and message in resp.json()["error"], resp.text


def test_bad_timeout_header_is_422(client, rows):
    resp = client.post("/predict", json={"instances": rows[:1].tolist()}, headers={"X-Request-Timeout-Ms": "soon"})
    assert resp.status_code == 422 and "milliseconds" in resp.json()["error"]


def test_batch_metrics_are_recorded(client, rows, reference):
    before = client.metrics.registry.get_sample_value("ensemble_member_disagreement_ratio_count",
                                                      {"model": "digits"}) or 0
    client.post("/predict", json={"instances": rows.tolist()})
    sample = client.metrics.registry.get_sample_value
    assert sample("ensemble_batch_size_rows_count") >= 1
    assert sample("ensemble_queue_depth_rows") == 0
    assert sample("ensemble_member_disagreement_ratio_count", {"model": "digits"}) == before + len(rows)
    top = str(int(np.argmax(reference[0])))
    assert sample("ensemble_predicted_class_total", {"model": "digits", "class": top}) >= 1
    assert sample("ensemble_ready") == 1


def test_responses_carry_their_length(client, rows):
    """One framed response, not chunked transfer encoding."""
    for resp in (client.post("/predict", json={"instances": rows.tolist()}), client.get("/predict"),
                 client.post("/predict", content=b"{")):
        assert int(resp.headers["content-length"]) == len(resp.content)
        assert "transfer-encoding" not in resp.headers


def test_inference_routes_answer_405_to_other_methods(client):
    resp = client.get("/predict")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert "GET is not allowed on /predict; use POST" in resp.json()["error"]
    assert client.get("/v2/models/digits/infer").status_code == 405
