"""The shared pins file read as untrusted bytes: every way it can be damaged keeps the pins read
before it and says so (log, metric, GET /models), a replica started on a damaged file serves no
version until it is repaired, and nothing writes a pin over a damaged file. The pin store alone,
`ensemble-admin`, and real servers."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from service import admin_cli
from service.lifecycle.pins import MAX_PINS_BYTES, PinsDamaged, PinStore
from contract.layout import MAX_VERSION
from tests.repo_tools import publish_copy
from tests.server import ServerProcess

TOKEN = "damaged-pins-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# What each damage does to the file, and the words the refusal must say.
DAMAGES = {
    "deeply nested": (b"[" * 100_000, "nested too deeply"),
    "10^22": (b'{"digits": 10000000000000000000000}', f"from 1 to {MAX_VERSION}: 10000000000000000000000"),
    "negative": (b'{"digits": -1}', "not a version number from 1 to"),
    "not an ensemble name": (b'{"../digits": 1}', "'../digits', which is not an ensemble name"),
    "truncated": (b'{"digits": 1', "is not JSON"),
    "not UTF-8": (b'{"digits": 1}\xff', "not UTF-8"),
    "UTF-16": ('{"digits": 1}'.encode("utf-16"), "not UTF-8"),  # json.loads(bytes) would read it
    "huge": (None, f"larger than {MAX_PINS_BYTES} bytes"),
    "fifo": (None, "not a regular file"),
    "symbolic link": (None, "symbolic link"),
    "folder": (None, "not a regular file"),
}


def damage(path: Path, kind: str) -> None:
    """Replace the pins file at `path` with one damaged as `kind` says."""
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)
    data, _ = DAMAGES[kind]
    if data is not None:
        path.write_bytes(data)
    elif kind == "huge":  # sparse: reading it whole would take 8 GiB
        with open(path, "wb") as f:
            f.truncate(8 << 30)
    elif kind == "fifo":  # opening it to read blocks until a writer comes, unless opened without blocking
        os.mkfifo(path)
    elif kind == "symbolic link":  # to good pins elsewhere: a link is refused, not followed
        (path.parent / "elsewhere.json").write_bytes(b'{"digits": 5}')
        path.symlink_to(path.parent / "elsewhere.json")
    elif kind == "folder":
        path.mkdir()


def refreshed(store: PinStore, timeout: float = 20) -> dict[str, int]:
    """store.refresh() in a thread, failing (not hanging) if it does not return in time."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(pins=store.refresh()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"reading the pins file did not return in {timeout} s"
    return result["pins"]


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_pins_file_keeps_the_last_good_pins_and_says_why(tmp_path, kind):
    writer, reader = PinStore(tmp_path), PinStore(tmp_path)
    writer.set("digits", 3)
    assert refreshed(reader) == {"digits": 3} and reader.state.state == "valid"
    damage(tmp_path / "pins.json", kind)

    assert refreshed(reader) == {"digits": 3}, "the pins read before stay in force"
    assert reader.state.state == "damaged" and reader.state.known
    assert DAMAGES[kind][1] in reader.state.error and str(tmp_path) not in reader.state.error
    assert len(reader.state.error) < 300
    since = reader.state.since
    assert refreshed(reader) == {"digits": 3} and reader.state.since == since  # no news: same state

    # a store that never read good pins knows none, and says the pins are unknown
    fresh = PinStore(tmp_path)
    assert refreshed(fresh) == {} and fresh.state.state == "unknown" and not fresh.state.known

    # nothing is written over it: what it held would be lost for every replica
    before = os.lstat(tmp_path / "pins.json")
    for store in (reader, fresh):
        with pytest.raises(PinsDamaged, match="repair it .* or remove it"):
            store.set("digits", 1)
    after = os.lstat(tmp_path / "pins.json")
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_the_pins_come_back_when_the_file_is_repaired_or_removed(tmp_path):
    store = PinStore(tmp_path)
    damage(tmp_path / "pins.json", "truncated")
    assert refreshed(store) == {} and store.state.state == "unknown"
    (tmp_path / "pins.json").write_bytes(b'{"digits": 2}')
    assert refreshed(store) == {"digits": 2} and store.state.state == "valid" and store.state.error is None
    damage(tmp_path / "pins.json", "negative")
    assert refreshed(store) == {"digits": 2} and store.state.state == "damaged"
    (tmp_path / "pins.json").unlink()
    assert refreshed(store) == {} and store.state.state == "valid"  # removed: no pins


def test_ensemble_admin_reports_a_damaged_file_and_does_not_write_over_it(repository, tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    damage(state / "pins.json", "deeply nested")
    args = ["--repository", str(repository), "--state-dir", str(state)]
    assert admin_cli.main([*args, "status"]) == admin_cli.EXIT_REFUSED
    out = capsys.readouterr()
    assert "digits: pins unknown (the pins file is damaged)" in out.out
    assert "nested too deeply" in out.err and "repair it or remove it" in out.err
    for command in (["pin", "digits", "1"], ["unpin", "digits"]):
        assert admin_cli.main([*args, *command]) == admin_cli.EXIT_REFUSED
        assert "is damaged" in capsys.readouterr().err
    assert (state / "pins.json").read_bytes() == b"[" * 100_000


# -- real servers --------------------------------------------------------------------------------

def pins_of(server: ServerProcess) -> dict:
    resp = server.client.get("/models")
    assert resp.status_code == 200, resp.text
    return resp.json()["pins"]


def pins_gauge(server: ServerProcess) -> float:
    text = server.client.get("/metrics").text
    return float(re.search(r"^ensemble_pins_file_valid (\S+)$", text, re.M).group(1))


def wait_until(predicate, timeout: float = 60, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


def test_a_damaged_pins_file_on_a_real_server_at_start_then_while_it_serves(repository, tmp_path):
    """Measured: every replica started on a deeply nested pins file failed to start; one started
    on a truncated file served the newest version although the fleet pinned another; a pin of
    10^22 made GET /models, /ui and the admin status answer 500."""
    state = tmp_path / "state"
    state.mkdir()
    publish_copy(repository)  # digits/2: the newest, which the fleet's pin (to 1) keeps off
    damage(state / "pins.json", "deeply nested")
    server = ServerProcess(repository, env={"ENSEMBLE_STATE_DIR": str(state), "ENSEMBLE_ADMIN_TOKEN": TOKEN})
    server.start(wait_ready=False)
    try:
        # started on a damaged file: it cannot know the fleet's pins, so it serves nothing, and says why
        wait_until(lambda: server.client.get("/models").status_code == 200, what="GET /models")
        ready = server.client.get("/readyz")
        assert ready.status_code == 503 and "pins file cannot be trusted" in ready.json()["reason"]
        assert "nested too deeply" in ready.json()["reason"]
        pins = pins_of(server)
        assert pins["state"] == "unknown" and "nested too deeply" in pins["error"] and pins["since"]
        assert server.models()["live"] is None
        assert pins_gauge(server) == 0
        assert server.client.post("/predict", json={"instances": [[[[0]] * 8] * 8]}).status_code == 503

        (state / "pins.tmp").write_bytes(b'{"digits": 1}')
        os.replace(state / "pins.tmp", state / "pins.json")  # repaired: the fleet's pin is known
        server.wait_live(1)
        assert pins_of(server) == {"state": "valid", "error": None, "since": None}
        assert pins_gauge(server) == 1 and server.client.get("/readyz").status_code == 200
        assert server.models()["pinned"] is True

        # damaged while it serves: the pins read before stay in force, every status route answers
        for kind in ("10^22", "deeply nested", "negative", "not an ensemble name", "truncated", "not UTF-8",
                     "huge", "fifo", "symbolic link"):
            damage(state / "pins.json", kind)
            pins = wait_until(lambda: (p := pins_of(server))["error"] and DAMAGES[kind][1] in p["error"] and p,
                              what=f"the {kind} pins file reported")
            assert pins["state"] == "damaged", kind
            for path in ("/models", "/ui", "/readyz", "/healthz"):
                assert server.client.get(path).status_code == 200, (kind, path)
            detail = server.client.get("/models/digits/status", headers=AUTH)
            assert detail.status_code == 200 and detail.json()["pinned"] is True, (kind, detail.text)
            assert (server.models()["live"], server.models()["policy"]) == (1, 1), kind
            assert pins_gauge(server) == 0, kind
            assert str(state) not in server.client.get("/models").text  # the path is the admins'
        # a pin is not written over the damaged file: 409, and the file is as it was
        resp = server.client.post("/models/digits/pin/2", headers=AUTH)
        assert resp.status_code == 409 and "is damaged" in resp.json()["error"], resp.text
        assert (state / "pins.json").is_symlink()

        (state / "pins.json").unlink()  # removed: no pins, the policy (the newest version) again
        wait_until(lambda: pins_of(server)["state"] == "valid", what="the pins file's removal seen")
        assert server.models()["policy"] == "latest" and pins_gauge(server) == 1
        output = server.output()
        assert "Traceback" not in output and "is damaged" in output and "are unknown here" in output
        assert output.count("nested too deeply") == 2, "said once per damage, not at every poll"
        httpx.get(f"{server.base}/healthz").raise_for_status()
    finally:
        server.kill()


def test_a_pin_waits_a_bounded_time_for_a_lock_another_writer_holds(tmp_path):
    """A writer that keeps the folder's lock (a stopped ensemble-admin, a hung share) costs a pin
    at most LOCK_WAIT_SECONDS, then a refusal: the caller may be the event loop."""
    import fcntl

    from service.lifecycle.pins import LOCK_WAIT_SECONDS, PinsNotShared

    store = PinStore(tmp_path)
    store.set("digits", 1)
    fd = os.open(tmp_path / ".pins.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by another open file description: as another process
    try:
        started = time.monotonic()
        with pytest.raises(PinsNotShared, match="another writer holds the pins lock"):
            store.set("digits", 2)
        assert time.monotonic() - started < LOCK_WAIT_SECONDS + 0.5
    finally:
        os.close(fd)
    store.set("digits", 2)  # free again: recorded
    assert PinStore(tmp_path).refresh() == {"digits": 2}
