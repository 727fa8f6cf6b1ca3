"""The HTTP API through the app's lifespan: predictions, errors, readiness, models, metrics."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.config import Settings
from service.metrics import ServiceMetrics
from contract.manifest import read_manifest
from contract.scores import served
from training.members import predict_saved_model


# Compiled versions shared by every app of the test session: a version is compiled once.
COMPILED = Path(tempfile.mkdtemp(prefix="tests-compiled-"))


def make_client(root, **kw) -> tuple[TestClient, ServiceMetrics]:
    metrics = ServiceMetrics(CollectorRegistry())
    # Loading in the loader thread: a child process per load (tests/test_frozen.py, the process
    # tests) would add ~10 s to each of these tests.
    kw.setdefault("isolated_loading", False)
    kw.setdefault("compile_cache_dir", COMPILED)
    settings = Settings(repository=root, poll_interval_seconds=0.1, warmup_batch_sizes=(1,), **kw)
    return TestClient(create_app(settings, metrics)), metrics


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_predict_matches_direct_calibrated_average_of_members(client, repository, digits_test_split):
    x = digits_test_split.x[:40]
    resp = client.post("/predict", content=orjson.dumps({"instances": x.tolist()}))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    vdir = repository / "digits" / "1"
    manifest = read_manifest(vdir)
    direct = np.stack([predict_saved_model(vdir / m.path, x) for m in manifest.members])
    assert manifest.temperature != 1.0  # calibrated by default: the temperature is served too
    expected = served(direct.transpose(1, 0, 2), manifest.weights, manifest.temperature)
    np.testing.assert_allclose(body["predictions"], expected, atol=1e-5)
    assert body["labels"] == [str(i) for i in np.argmax(expected, axis=1)]
    assert body["classes"] == [str(i) for i in range(10)]
    assert body["model"] == {"name": "digits", "version": 1}


def test_predict_accepts_the_raw_integer_pixels_of_the_data(client, digits_test_split):
    x = digits_test_split.x[:3].astype(int)
    body = client.post("/predict", json={"instances": x.tolist()}).json()
    assert len(body["predictions"]) == 3
    np.testing.assert_allclose(np.sum(body["predictions"], axis=1), 1.0, atol=1e-4)


def test_predict_can_return_members_and_disagreement(client, digits_test_split):
    body = client.post("/predict?members=true", json={"instances": digits_test_split.x[:2].tolist()}).json()
    assert list(body["members"]) == ["tuned-0", "seed-1", "snapshot-2", "snapshot-3", "swa-4"]
    assert all(np.shape(v) == (2, 10) for v in body["members"].values())
    assert len(body["disagreement"]) == 2 and all(0 <= d <= 1 for d in body["disagreement"])


@pytest.mark.parametrize(
    "content, status, message",
    [
        (b"{broken", 400, "not valid JSON"),
        (b'{"rows": []}', 422, "missing field 'instances'"),
        (b'{"instances": []}', 422, "is empty"),
        (b'{"instances": [[1, 2, 3]]}', 422, r"shape [8, 8, 1], got [3]"),
        (b'{"instances": "abc"}', 422, "must be a list"),
        (orjson.dumps({"instances": [[[["x"]] * 8] * 8]}), 422, "numbers only"),
        (orjson.dumps({"instances": [[[[1e39]] * 8] * 8]}), 422, "non-finite"),
    ],
)
def test_bad_input_gets_json_error_and_service_keeps_serving(client, digits_test_split, content, status, message):
    resp = client.post("/predict", content=content)
    assert resp.status_code == status
    assert message in resp.json()["error"]
    assert client.post("/predict", json={"instances": digits_test_split.x[:1].tolist()}).status_code == 200


def test_too_many_rows_is_413(repository, digits_test_split):
    c, _ = make_client(repository, max_rows_per_request=2)
    with c:
        resp = c.post("/predict", json={"instances": digits_test_split.x[:3].tolist()})
    assert resp.status_code == 413 and "at most 2" in resp.json()["error"]


def test_the_server_sets_the_configured_switch_interval_and_gives_it_back(repository):
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        c, _ = make_client(repository, switch_interval_ms=0.5)
        with c:
            assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.004)  # given back at shutdown
        c, _ = make_client(repository, switch_interval_ms=0)  # 0: left as it is
        with c:
            assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(before)


def test_unknown_route_is_json_404(client):
    resp = client.get("/nope")
    assert resp.status_code == 404 and resp.json() == {"error": "Not Found"}


def test_health_models_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["reason"] == "digits version 1 is live"
    (model,) = client.get("/models").json()["models"]
    assert (model["name"], model["live"]) == ("digits", 1)
    assert model["versions"][0]["state"] == "live" and model["versions"][0]["members"] == 5
    assert model["versions"][0]["engine"] == "tflite"
    client.post("/predict", json={"instances": []})
    text = client.get("/metrics").text
    assert 'ensemble_model_version{model="digits"} 1.0' in text
    assert client.metrics.registry.get_sample_value(
        "ensemble_requests_total", {"protocol": "http", "route": "/predict", "status": "422"}) == 1.0
    assert client.metrics.registry.get_sample_value(
        "ensemble_request_duration_seconds_count", {"protocol": "http", "route": "/predict"}) == 1.0


def test_empty_repository_is_not_ready_then_becomes_ready_by_itself(trained_repository, tmp_path, digits_test_split):
    root = tmp_path / "models"
    c, _ = make_client(root)
    with c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "holds no ensemble" in ready.json()["reason"]
        resp = c.post("/predict", json={"instances": digits_test_split.x[:1].tolist()})
        assert resp.status_code == 503 and "no ensemble" in resp.json()["error"]
        shutil.copytree(trained_repository / "digits", root / "digits", ignore=shutil.ignore_patterns(".*"))
        assert wait_for(lambda: c.get("/readyz").status_code == 200)
        assert c.post("/predict", json={"instances": digits_test_split.x[:1].tolist()}).status_code == 200


def test_broken_new_version_is_not_served_and_says_why(client, repository):
    src, dst = repository / "digits" / "1", repository / "digits" / "2"
    shutil.copytree(src, dst)
    manifest = (dst / "manifest.json").read_text().replace('"version": 1', '"version": 2')
    member = read_manifest(src).members[0]
    victim = dst / member.path / "saved_model.pb"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated after the manifest was written
    (dst / "manifest.json").write_text(manifest)

    def failed():
        versions = client.get("/models").json()["models"][0]["versions"]
        return versions[0]["state"] == "failed" and versions[0]

    assert wait_for(failed)
    assert failed()["category"] == "checksum" and "reason" not in failed()  # public: no file names
    assert client.get("/models").json()["models"][0]["live"] == 1
    assert client.metrics.registry.get_sample_value(
        "ensemble_model_reloads_total", {"model": "digits", "result": "failure"}) == 1.0


def copy_as(repository, name):
    """Publish the digits version again under another ensemble name."""
    dst = repository / name / "1"
    shutil.copytree(repository / "digits" / "1", dst)
    raw = (dst / "manifest.json").read_text().replace('"name": "digits"', f'"name": "{name}"')
    (dst / "manifest.json").write_text(raw)


def test_several_ensembles_are_served_by_name(repository, digits_test_split):
    copy_as(repository, "other")
    rows = {"instances": digits_test_split.x[:2].tolist()}
    c, _ = make_client(repository)
    with c:
        assert c.get("/readyz").status_code == 200
        for name in ("digits", "other"):
            resp = c.post(f"/v1/models/{name}:predict", json=rows)
            assert resp.status_code == 200 and resp.json()["model"]["name"] == name
        unknown = c.post("/v1/models/nope:predict", json=rows)
        assert unknown.status_code == 404 and "known: digits, other" in unknown.json()["error"]
        ambiguous = c.post("/predict", json=rows)
        assert ambiguous.status_code == 404 and "ENSEMBLE_DEFAULT_MODEL" in ambiguous.json()["error"]
    c, _ = make_client(repository, default_model="other")
    with c:
        assert c.post("/predict", json=rows).json()["model"]["name"] == "other"


def test_a_broken_ensemble_does_not_make_the_others_unready(repository):
    copy_as(repository, "broken")
    (repository / "broken" / "1" / "manifest.json").write_text("{}")
    c, _ = make_client(repository)
    with c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and "digits version 1 is live" in ready.json()["reason"]
        assert c.post("/v1/models/broken:predict", json={"instances": []}).status_code == 503
    c, _ = make_client(repository, default_model="broken", admin_token="a-token-of-sixteen-chars")
    with c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "failed its checks (manifest" in ready.json()["reason"]
        assert "manifest.json" not in ready.json()["reason"]  # the reason (a path) is the admins'
        detail = c.get("/models/broken/status", headers={"Authorization": "Bearer a-token-of-sixteen-chars"})
        assert "does not follow the schema" in detail.json()["versions"][0]["reason"]
