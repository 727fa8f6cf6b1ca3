"""`ensemble-serve --repository s3://...` against a real S3 server (SeaweedFS on loopback): the
versions on the store are downloaded, checked and served, a new one goes live by itself, and a
store that refuses the credentials or stops answering leaves the service up, saying why, with
the versions it has loaded still answering."""

from __future__ import annotations

import json
import time

import orjson
import pytest

from contract.layout import MANIFEST_FILE
from contract.store import RemoteStore
from tests.loadgen import Load
from tests.repo_tools import upload_copy
from tests.s3server import S3Server
from tests.server import ServerProcess

pytest.importorskip("obstore")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture()
def remote(s3, trained_repository, monkeypatch, request, tmp_path):
    """A store prefix of this test's own holding digits/1, and the server's environment."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    url = s3.url(f"serve-{request.node.name[:30]}-{time.time_ns()}")
    store = RemoteStore(url)
    upload_copy(store, trained_repository / "digits" / "1", "digits", 1)
    return store, {**s3.env(), "ENSEMBLE_CACHE_DIR": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def body(digits_test_split) -> bytes:
    return orjson.dumps({"instances": digits_test_split.x[:2].tolist()})


def test_versions_on_the_store_are_served_and_a_new_one_goes_live(remote, trained_repository, body, tmp_path):
    store, env = remote
    server = ServerProcess(store.url, env=env).start(timeout=240)
    try:
        first = server.client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert first.status_code == 200 and first.json()["model"]["version"] == 1
        assert (tmp_path / "cache" / "digits" / "1" / MANIFEST_FILE).is_file()
        upload_copy(store, trained_repository / "digits" / "1", "digits", 2)
        server.wait_live(2, timeout=240)
        second = server.client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert second.json()["model"]["version"] == 2
        assert second.json()["predictions"] == first.json()["predictions"]
        assert server.client.get("/models").json()["store"] == {"readable": True}
    finally:
        server.kill()


def test_wrong_credentials_leave_the_server_up_not_ready_and_saying_why(remote, s3):
    store, env = remote
    server = ServerProcess(store.url, env={**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    server.start(wait_ready=False, timeout=60)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = server.client.get("/readyz")
            if "object store" in ready.text:
                break
            time.sleep(0.2)
        assert ready.status_code == 503
        assert "access denied (403)" in ready.text and "not-the-secret" not in ready.text
        models = server.client.get("/models").json()
        assert models["store"]["readable"] is False and "403" in models["store"]["error"]
        log = server.output()
        assert "object store cannot be read" in log and log.count("object store cannot be read") == 1
        assert "not-the-secret" not in log
    finally:
        server.kill()


@pytest.mark.slow
def test_the_store_stopped_and_started_under_load_fails_no_request(remote, s3, body):
    store, env = remote
    server = ServerProcess(store.url, env=env).start(timeout=240)
    try:
        with Load(server.port, body, connections=4) as load:
            time.sleep(2)
            s3.stop()
            deadline = time.monotonic() + 30
            while server.client.get("/models").json()["store"]["readable"] and time.monotonic() < deadline:
                time.sleep(0.2)
            down = server.client.get("/models").json()["store"]
            ready_while_down = server.client.get("/readyz").status_code
            time.sleep(3)
            s3.start()
            deadline = time.monotonic() + 60
            while not server.client.get("/models").json()["store"]["readable"] and time.monotonic() < deadline:
                time.sleep(0.2)
            back = server.client.get("/models").json()["store"]
            time.sleep(1)
        assert down == {"readable": False, "error": "the store did not answer (down, or a wrong endpoint)"}
        assert ready_while_down == 200  # version 1 is loaded and answers
        assert back == {"readable": True}
        result = load.result
        assert result.statuses == {200: len(result.answers)}, (result.statuses, result.errors[:3])
        assert len(result.answers) > 100
        log = server.output()
        assert "answers again" in log, log[-2000:]
        json.dumps(down)
    finally:
        server.kill()


@pytest.mark.slow
def test_two_replicas_follow_a_rollback_through_the_store(remote, trained_repository, tmp_path):
    """A rollback sent to one replica is a pin on the store (compare-and-swap); the other
    replica, with a cache of its own, follows within a poll, and a replica started later too."""
    store, env = remote
    token = "store-admin-token"
    envs = [{**env, "ENSEMBLE_CACHE_DIR": str(tmp_path / f"cache-{k}"), "ENSEMBLE_ADMIN_TOKEN": token}
            for k in "abc"]
    a = ServerProcess(store.url, env=envs[0]).start(timeout=240)
    b = ServerProcess(store.url, env=envs[1]).start(timeout=240)
    try:
        upload_copy(store, trained_repository / "digits" / "1", "digits", 2)  # 1 stays loaded as the previous
        a.wait_live(2, timeout=240)
        b.wait_live(2, timeout=240)
        reply = a.client.post("/models/digits/rollback", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 200, reply.text
        assert a.models()["live"] == 1
        b.wait_live(1, timeout=60)
        assert json.loads(store.read(".state/pins.json")[0]) == {"digits": 1}
        c = ServerProcess(store.url, env=envs[2]).start(timeout=240)
        try:
            c.wait_live(1, timeout=240)
        finally:
            c.kill()
    finally:
        a.kill()
        b.kill()
