"""Uncertainty per prediction through the app: `?uncertainty=true` on the row routes, the Open
Inference Protocol outputs by name (JSON and binary), the metadata, and the drift metrics."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from contract.manifest import read_manifest
from contract.scores import SCORES, served, uncertainty
from tests.test_api import make_client
from training.members import predict_saved_model


@pytest.fixture()
def expected(repository, digits_test_split):
    """(rows, served probabilities, scores, abstain flags, manifest) computed from the members."""
    x = digits_test_split.x[:24]
    vdir = repository / "digits" / "1"
    manifest = read_manifest(vdir)
    members = np.stack([predict_saved_model(vdir / m.path, x) for m in manifest.members], axis=1)
    out = served(members, manifest.weights, manifest.temperature)
    scores = uncertainty(out, members, manifest.weights)
    a = manifest.abstention
    return x, out, scores, scores[:, SCORES.index(a.score)] > a.threshold, manifest


@pytest.mark.parametrize("route", ["/predict", "/v1/models/digits:predict"])
def test_uncertainty_true_adds_each_rows_scores_and_abstain(client, expected, route):
    x, out, scores, abstain, _ = expected
    body = client.post(f"{route}?uncertainty=true", json={"instances": x.tolist()}).json()
    assert set(body["uncertainty"]) == set(SCORES)
    for j, name in enumerate(SCORES):
        np.testing.assert_allclose(body["uncertainty"][name], scores[:, j], atol=1e-5)
    u = body["uncertainty"]
    assert all(m >= 0 for m in u["mutual_information"])
    assert body["abstain"] == abstain.tolist()
    plain = client.post(route, json={"instances": x.tolist()}).json()
    assert "uncertainty" not in plain and "abstain" not in plain
    np.testing.assert_allclose(plain["predictions"], out, atol=1e-5)


def test_manifest_holds_temperature_abstention_and_validation_level(expected):
    manifest = expected[-1]
    assert manifest.calibration.method == "temperature" and 0.05 <= manifest.temperature <= 20
    assert manifest.abstention.score in SCORES and manifest.abstention.target_error == 0.02
    assert set(manifest.uncertainty_reference) == set(SCORES)


def test_v2_serves_uncertainty_outputs_by_name_json_and_binary(client, expected):
    x, _, scores, abstain, _ = expected
    inputs = [{"name": "instances", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]
    wanted = [{"name": n} for n in (*SCORES, "abstain")]
    body = client.post("/v2/models/digits/infer", json={"inputs": inputs, "outputs": wanted}).json()
    got = {o["name"]: o for o in body["outputs"]}
    for j, name in enumerate(SCORES):
        assert got[name]["datatype"] == "FP32" and got[name]["shape"] == [len(x)]
        np.testing.assert_allclose(got[name]["data"], scores[:, j], atol=1e-5)
    assert got["abstain"]["datatype"] == "BOOL" and got["abstain"]["data"] == abstain.tolist()

    head = orjson.dumps({"inputs": [{"name": "instances", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "mutual_information", "parameters": {"binary_data": True}},
                                     {"name": "abstain", "parameters": {"binary_data": True}}]})
    resp = client.post("/v2/models/digits/infer", content=head + x.astype("<f4").tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(head))})
    assert resp.status_code == 200, resp.text
    length = int(resp.headers["inference-header-content-length"])
    header, raw = orjson.loads(resp.content[:length]), resp.content[length:]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [len(x) * 4, len(x)]
    np.testing.assert_allclose(np.frombuffer(raw[:sizes[0]], "<f4"), scores[:, 2], atol=1e-5)
    assert np.frombuffer(raw[sizes[0]:], np.bool_).tolist() == abstain.tolist()


def test_v2_metadata_lists_the_uncertainty_outputs(client, expected):
    meta = client.get("/v2/models/digits").json()
    names = [o["name"] for o in meta["outputs"]]
    assert names == ["probabilities", "members", *SCORES, "abstain"]
    assert meta["parameters"]["temperature"] == pytest.approx(expected[-1].temperature)
    assert meta["parameters"]["abstention"]["score"] == expected[-1].abstention.score


def test_abstain_output_of_a_version_without_threshold_is_a_clear_422(repository, digits_test_split):
    vdir = repository / "digits" / "1"
    raw = orjson.loads((vdir / "manifest.json").read_bytes())
    del raw["abstention"]
    (vdir / "manifest.json").write_bytes(orjson.dumps(raw))
    c, _ = make_client(repository)
    x = digits_test_split.x[:2]
    with c:
        inputs = [{"name": "instances", "shape": [2, 8, 8, 1], "datatype": "FP32", "data": x.reshape(-1).tolist()}]
        resp = c.post("/v2/models/digits/infer", json={"inputs": inputs, "outputs": [{"name": "abstain"}]})
        assert resp.status_code == 422 and "has no abstention threshold" in resp.json()["error"]
        body = c.post("/predict?uncertainty=true", json={"instances": x.tolist()}).json()
        assert "abstain" not in body and len(body["uncertainty"]["entropy"]) == 2


def test_mutual_information_is_observed_per_row_with_the_reference_level(client, expected):
    x, _, scores, abstain, manifest = expected
    before = client.metrics.registry.get_sample_value(
        "ensemble_mutual_information_nats_count", {"model": "digits"}) or 0
    client.post("/predict", json={"instances": x.tolist()})
    sample = client.metrics.registry.get_sample_value
    assert sample("ensemble_mutual_information_nats_count", {"model": "digits"}) == before + len(x)
    assert sample("ensemble_mutual_information_nats_sum", {"model": "digits"}) >= scores[:, 2].sum() - 1e-4
    assert sample("ensemble_reference_mutual_information_nats", {"model": "digits"}) == pytest.approx(
        manifest.uncertainty_reference["mutual_information"])
    assert (sample("ensemble_abstained_rows_total", {"model": "digits"}) or 0) >= abstain.sum()


def test_rows_above_a_threshold_abstain_in_every_route_and_are_counted(repository, digits_test_split):
    """A threshold that splits the rows (the fixture's own answers every validation row)."""
    vdir = repository / "digits" / "1"
    raw = orjson.loads((vdir / "manifest.json").read_bytes())
    manifest = read_manifest(vdir)
    x = digits_test_split.x[:40]
    members = np.stack([predict_saved_model(vdir / m.path, x) for m in manifest.members], axis=1)
    scores = uncertainty(served(members, manifest.weights, manifest.temperature), members, manifest.weights)
    ordered = np.sort(scores[:, 0])
    threshold = float(ordered[19] + ordered[20]) / 2  # between two rows: float32 rounding cannot flip one
    raw["abstention"] = {"score": "entropy", "threshold": threshold, "target_error": 0.02, "coverage": 0.5}
    (vdir / "manifest.json").write_bytes(orjson.dumps(raw))
    want = scores[:, 0] > threshold
    c, metrics = make_client(repository)
    with c:
        body = c.post("/predict?uncertainty=true", json={"instances": x.tolist()}).json()
        assert body["abstain"] == want.tolist() and 0 < sum(body["abstain"]) < len(x)
        inputs = [{"name": "instances", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]
        v2 = c.post("/v2/models/digits/infer", json={"inputs": inputs, "outputs": [{"name": "abstain"}]}).json()
        assert v2["outputs"][0]["data"] == want.tolist()
        assert metrics.registry.get_sample_value("ensemble_abstained_rows_total", {"model": "digits"}) == 2 * want.sum()
