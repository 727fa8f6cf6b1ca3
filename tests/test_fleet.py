"""Fleet-wide control: two real server processes on one repository, with default settings (no
state folder). A rollback, pin or unpin sent to one replica, or written by `ensemble-admin`
without HTTP, reaches the other within a poll interval plus a load; a version published after a
rollback does not undo it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.repo_tools import publish_copy
from tests.server import ServerProcess

TOKEN = "fleet-admin-token-0123456789"
pytestmark = pytest.mark.slow


def admin(repository, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.admin_cli", "--repository", str(repository), *args],
                          capture_output=True, text=True, timeout=120)


def test_rollback_pin_and_unpin_reach_every_replica(repository):
    env = {"ENSEMBLE_ADMIN_TOKEN": TOKEN}
    a, b = ServerProcess(repository, env=env), ServerProcess(repository, env=env)
    try:
        a.start(), b.start()
        publish_copy(repository)  # digits/2: both replicas load it, 1 stays loaded as the previous
        a.wait_live(2, timeout=120), b.wait_live(2, timeout=120)

        # a rollback sent to one replica: the other follows at its next poll
        resp = a.client.post("/models/digits/rollback", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 200, resp.text
        assert a.models()["live"] == 1
        followed_in = b.wait_live(1, timeout=120)
        assert b.models()["pinned"] is True

        # a version published after the rollback does not undo it, on either replica
        publish_copy(repository)  # digits/3
        time.sleep(3)  # 15 polls
        assert a.models()["live"] == 1 and b.models()["live"] == 1
        assert {v["version"] for v in a.models()["versions"]} == {1, 2, 3}

        # without HTTP: unpin, then pin, with ensemble-admin
        done = admin(repository, "unpin", "digits")
        assert done.returncode == 0, done.stderr
        a.wait_live(3, timeout=120), b.wait_live(3, timeout=120)
        done = admin(repository, "pin", "digits", "2")
        assert done.returncode == 0 and "pinned to version 2" in done.stdout, done.stderr
        a.wait_live(2, timeout=120), b.wait_live(2, timeout=120)
        done = admin(repository, "rollback", "digits")  # the version before the pinned 2
        assert done.returncode == 0 and "pinned to version 1" in done.stdout, done.stderr
        a.wait_live(1, timeout=120), b.wait_live(1, timeout=120)

        # unpin through the other replica's HTTP route: both back to the newest
        resp = b.client.delete("/models/digits/pin", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 200, resp.text
        a.wait_live(3, timeout=120), b.wait_live(3, timeout=120)
        print(f"\n[figures] fleet: a rollback on one replica reached the other in {followed_in:.1f} s "
              "(poll interval 0.2 s; version 1 was still loaded there, as its previous version)")
        for server in (a, b):
            assert "Traceback" not in server.output()
    finally:
        a.kill(), b.kill()


def test_ensemble_admin_refuses_what_it_cannot_do(repository):
    assert admin(repository, "pin", "digits", "9").returncode == 1
    assert "no committed version 9" in admin(repository, "pin", "digits", "9").stderr
    assert "no ensemble named 'nothere'" in admin(repository, "unpin", "nothere").stderr
    assert "no committed version before 1" in admin(repository, "rollback", "digits").stderr
    (repository / "digits" / "1" / "members").rename(repository / "digits" / "1" / "gone")
    broken = admin(repository, "pin", "digits", "1")
    assert broken.returncode == 1 and "fails its checks" in broken.stderr
    assert "following the policy" in admin(repository, "status").stdout


def test_a_pin_that_cannot_be_shared_is_refused_not_kept_by_one_replica(repository):
    """No state folder, and the repository's shared state cannot be written: a rollback or a pin
    is a 409 that says what to do, and nothing changes."""
    (repository / ".state").write_text("a file where the shared state folder belongs")
    server = ServerProcess(repository, env={"ENSEMBLE_ADMIN_TOKEN": TOKEN}).start()
    try:
        publish_copy(repository)
        server.wait_live(2, timeout=120)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/models/digits/rollback", "/models/digits/pin/1"):
            resp = server.client.post(path, headers=auth)
            assert resp.status_code == 409 and "ENSEMBLE_STATE_DIR" in resp.json()["error"], resp.text
        assert server.models()["live"] == 2 and server.models()["pinned"] is False
    finally:
        server.kill()
