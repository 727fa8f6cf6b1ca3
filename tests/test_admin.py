"""Admin routes (reload, rollback, pin), the pin store, and failure reporting in GET /models."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.lifecycle.pins import PinStore
from tests.repo_tools import publish_copy
from tests.test_api import make_client, wait_for

TOKEN = "s3cret-admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def live_version(client, name="digits"):
    return client.post(f"/v1/models/{name}:predict", json={"instances": [[[[0]] * 8] * 8]}).json()["model"]["version"]


@pytest.fixture()
def admin(repository, tmp_path):
    c, metrics = make_client(repository, admin_token=TOKEN, state_dir=tmp_path / "state")
    with c:
        c.metrics = metrics
        yield c


def test_admin_routes_are_disabled_without_a_configured_token(repository):
    c, _ = make_client(repository)
    with c:
        for method, path in [("post", "/models/digits/reload"), ("post", "/models/digits/rollback"),
                             ("post", "/models/digits/pin/1"), ("delete", "/models/digits/pin")]:
            resp = getattr(c, method)(path, headers=AUTH)
            assert resp.status_code == 403, path
            assert "ENSEMBLE_ADMIN_TOKEN" in resp.json()["error"]


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", f"Basic {TOKEN}", "Bearer", TOKEN])
def test_admin_routes_want_the_exact_bearer_token(admin, header):
    headers = {"Authorization": header} if header else {}
    resp = admin.post("/models/digits/reload", headers=headers)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in resp.json()["error"]


def test_short_admin_token_is_refused_at_start_and_empty_means_unset():
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(admin_token="short")
    assert Settings(admin_token="").admin_token is None


def test_reload_pin_rollback_and_unpin(admin, repository):
    assert live_version(admin) == 1
    v2 = publish_copy(repository)
    resp = admin.post("/models/digits/reload", headers=AUTH)  # at once, not at the next poll
    assert resp.status_code == 200 and resp.json()["live"] == v2
    assert live_version(admin) == v2

    resp = admin.post("/models/digits/rollback", headers=AUTH)
    body = resp.json()
    assert resp.status_code == 200 and (body["live"], body["previous"], body["pinned"]) == (1, v2, True)
    assert live_version(admin) == 1
    v3 = publish_copy(repository)
    admin.post("/models/digits/reload", headers=AUTH)
    assert live_version(admin) == 1, "a rollback stays pinned while new versions arrive"
    assert admin.metrics.registry.get_sample_value("ensemble_model_pinned_version", {"model": "digits"}) == 1

    assert admin.post(f"/models/digits/pin/{v2}", headers=AUTH).json()["live"] == v2
    assert live_version(admin) == v2
    resp = admin.delete("/models/digits/pin", headers=AUTH)
    assert resp.status_code == 200 and (resp.json()["live"], resp.json()["pinned"]) == (v3, False)
    assert live_version(admin) == v3
    assert admin.metrics.registry.get_sample_value("ensemble_model_pinned_version", {"model": "digits"}) == 0


def test_admin_errors_are_clear(admin, repository):
    resp = admin.post("/models/digits/rollback", headers=AUTH)
    assert resp.status_code == 409 and "no previous version" in resp.json()["error"]
    resp = admin.post("/models/digits/pin/7", headers=AUTH)
    assert resp.status_code == 404 and "no committed version 7" in resp.json()["error"]
    assert admin.post("/models/digits/pin/0", headers=AUTH).status_code == 422
    assert admin.post("/models/nope/reload", headers=AUTH).status_code == 404

    def wrong_shape(raw):
        raw["input"]["shape"] = [64]

    bad = publish_copy(repository, edit=wrong_shape)
    resp = admin.post(f"/models/digits/pin/{bad}", headers=AUTH)
    assert resp.status_code == 409 and "manifest says [64]" in resp.json()["error"]
    assert live_version(admin) == 1 and admin.get("/models").json()["models"][0]["pinned"] is False


def test_pins_survive_a_restart_through_the_state_dir(repository, tmp_path):
    state = tmp_path / "state"
    v2 = publish_copy(repository)
    c, _ = make_client(repository, admin_token=TOKEN, state_dir=state)
    with c:
        assert live_version(c) == v2
        assert c.post("/models/digits/pin/1", headers=AUTH).status_code == 200
    c, _ = make_client(repository, admin_token=TOKEN, state_dir=state)
    with c:
        assert live_version(c) == 1, "a restarted service keeps the pin"
        assert c.get("/models").json()["models"][0]["policy"] == 1


def test_pin_store_sees_pins_written_by_another_process(tmp_path):
    mine, theirs = PinStore(tmp_path), PinStore(tmp_path)
    theirs.set("digits", 3)
    assert mine.refresh() == {"digits": 3}
    theirs.set("digits", None)
    assert mine.refresh() == {}
    (tmp_path / "pins.json").write_text("not json")
    os.utime(tmp_path / "pins.json", ns=(1, 1))
    assert mine.refresh() == {}  # unreadable: logged and ignored, the service keeps going


def test_every_refused_version_shows_its_reason_and_is_counted(admin, repository):
    """Not committed, bad manifest, checksum mismatch, wrong shape: each one shown and counted."""
    root = repository / "digits"
    shutil.copytree(root / "1" / "members", root / "2" / "members")  # no manifest
    publish_copy(repository, edit=lambda raw: raw.pop("members"))

    def refused():  # the reasons are the admins' (they name files); GET /models shows categories
        versions = {v["version"]: v for v in admin.get("/models/digits/status", headers=AUTH).json()["versions"]}
        return versions if all("reason" in versions.get(n, {}) for n in (2, 3)) else None

    assert wait_for(refused)
    versions = refused()
    assert versions[2]["state"] == "uncommitted" and "no manifest.json" in versions[2]["reason"]
    assert versions[3]["state"] == "failed" and versions[3]["category"] == "manifest"
    public = {v["version"]: v for v in admin.get("/models").json()["models"][0]["versions"]}
    assert public[3]["category"] == "manifest" and "reason" not in public[3]
    assert str(repository) not in admin.get("/models").text + admin.get("/readyz").text
    assert admin.get("/models/digits/status").status_code == 401
    assert live_version(admin) == 1
    sample = admin.metrics.registry.get_sample_value
    assert sample("ensemble_model_reload_failures_total", {"model": "digits", "reason": "uncommitted"}) == 1
    assert sample("ensemble_model_reload_failures_total", {"model": "digits", "reason": "manifest"}) == 1
    admin.post("/models/digits/reload", headers=AUTH)
    assert sample("ensemble_model_reload_failures_total", {"model": "digits", "reason": "manifest"}) == 1, \
        "a failed version is not retried until its files change"


def test_rollback_during_a_slow_load_is_immediate_and_stays(repository):
    from prometheus_client import CollectorRegistry

    from service.engines.base import Ensemble
    from service.lifecycle.manager import ModelManager
    from service.metrics import ServiceMetrics

    release, loading = threading.Event(), threading.Event()

    class Unused:  # an engine never called: the scenario is about versions going live
        kind = "fake"

    def loader(manifest, path, pace):
        if manifest.version == 3:  # a version that takes long to compile
            loading.set()
            release.wait(30)
        return Ensemble(manifest, path, Unused())

    async def scenario():
        manager = ModelManager(repository, loader, ServiceMetrics(CollectorRegistry()), poll_interval=3600)
        await manager.start()
        publish_copy(repository)
        await manager.poll_once()
        assert manager.live("digits").version == 2
        publish_copy(repository)
        polling = asyncio.create_task(manager.poll_once())
        # version 3 is loading, the manager's lock held
        assert await asyncio.get_running_loop().run_in_executor(None, loading.wait, 30)
        started = time.monotonic()
        await asyncio.wait_for(manager.rollback("digits"), 1)
        assert manager.live("digits").version == 1
        assert time.monotonic() - started < 0.5
        release.set()
        await polling
        assert manager.live("digits").version == 1, "the load that finished later did not undo the rollback"
        assert manager.pins.get("digits") == 1
        await manager.pin("digits", 3)  # pinning over a pin loads and serves the new one
        assert manager.live("digits").version == 3 and manager.pins.get("digits") == 3
        await manager.stop()

    asyncio.run(scenario())
