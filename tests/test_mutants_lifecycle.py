"""The version lifecycle (service.lifecycle: the manager, the pins, the status, pacing, memory,
the snapshot) in process, with a fake loader and version folders of one small file: exact
messages, status dictionaries, metrics, pins files and log lines, for what the mutation run
(mutation/run.py lifecycle) found untested. No TensorFlow, no server."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import re
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from contract.integrity import file_digests
from contract.layout import MAX_VERSION, VersionDir
from contract.manifest import InputSpec, Manifest, MemberEntry, OutputSpec
from service.engines.base import Ensemble
from service.errors import Conflict, ModelNotFound, NotReady
from service.lifecycle import manager as manager_module
from service.lifecycle import memory, pacing, pins as pins_module
from service.lifecycle.manager import UNCOMMITTED_REASON, ModelManager
from service.lifecycle.pacing import LOADER_NICENESS, Pacer
from service.lifecycle.pins import PinsDamaged, PinsNotShared, PinsState, PinStore, parse, short, unreadable
from service.lifecycle.snapshot import EnsembleScan, Snapshot, version_stamp
from service.lifecycle.status import when
from service.metrics import ServiceMetrics

NOW = 1_700_000_000.0  # what time.time() says in the manager and the pins store here
NOW_ISO = "2023-11-14T22:13:20+00:00"
CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
CREATED_ISO = "2026-01-02T03:04:05+00:00"
NO_VERSION = "no committed version (a version folder needs its manifest.json)"
VALID_PINS = {"state": "valid", "error": None, "since": None}


def write_version(root: Path, name: str, version: int, *, committed: bool = True, members: int = 1,
                  metrics: dict | None = None, reference: dict | None = None) -> Path:
    """A version folder of `members` one-file members, with its manifest unless not `committed`."""
    vdir = root / name / str(version)
    entries = []
    for i in range(members):
        member = vdir / "members" / f"m{i}"
        member.mkdir(parents=True)
        (member / "saved_model.pb").write_bytes(b"weights")
        entries.append(MemberEntry(name=f"m{i}", path=f"members/m{i}", kind="tuned", weight=1 / members,
                                   files=file_digests(member)))
    manifest = Manifest(name=name, version=version, created=CREATED, input=InputSpec(shape=(2,)),
                        output=OutputSpec(classes=("a", "b")), members=tuple(entries),
                        metrics=metrics or {}, uncertainty_reference=reference or {})
    if committed:
        (vdir / "manifest.json").write_text(manifest.model_dump_json())
    return vdir


class FakeEngine:
    kind = "fake"


class FakeLoader:
    """Makes an Ensemble of any verified version; records the versions asked for, and the name
    and nice value of the thread that asked. `fail[v]`: what the next loads of v raise, in turn
    (None: it loads), the last one again and again; `gate[v]`: an event the load of v waits for."""

    def __init__(self, fail: dict | None = None, gate: dict | None = None, delay: float = 0.0):
        self.fail = {v: list(e) for v, e in (fail or {}).items()}
        self.gate = gate or {}
        self.delay = delay
        self.calls: list[int] = []
        self.threads: set[tuple[str, int]] = set()
        self.entered = threading.Event()

    def __call__(self, manifest, path, pace):
        self.calls.append(manifest.version)
        self.threads.add((threading.current_thread().name,
                          os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        if manifest.version in self.gate:
            self.entered.set()
            self.gate[manifest.version].wait(10)
        if self.delay:
            time.sleep(self.delay)
        outcomes = self.fail.get(manifest.version)
        if outcomes:
            error = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
            if error is not None:
                raise error
        return Ensemble(manifest, path, FakeEngine())


class ThreadNoting(PinStore):
    """A pin store that notes the thread of each refresh (a poll's scan) and can hold one."""

    def __init__(self, folder=None):
        super().__init__(folder)
        self.threads: set[str] = set()
        self.hold: threading.Event | None = None
        self.held = threading.Event()

    def refresh(self):
        if threading.current_thread() is not threading.main_thread():
            self.threads.add(threading.current_thread().name)
            if self.hold is not None:
                self.held.set()
                self.hold.wait(10)
        return super().refresh()


@pytest.fixture()
def fixed_time(monkeypatch):
    """time.time() is NOW in the manager and the pins store (failed_at, since)."""
    clock = SimpleNamespace(time=lambda: NOW, monotonic=time.monotonic)
    monkeypatch.setattr(manager_module, "time", clock)
    monkeypatch.setattr(pins_module, "time", clock)


@pytest.fixture()
def swaps(monkeypatch) -> list[bool]:
    """The `first` of every release_garbage after a swap (no real gc.freeze in the tests)."""
    calls: list[bool] = []
    monkeypatch.setattr(manager_module, "release_garbage", lambda first: calls.append(first))
    return calls


def make(root: Path, loader=None, pins=None, **kwargs) -> ModelManager:
    return ModelManager(root, loader or FakeLoader(), ServiceMetrics(CollectorRegistry()),
                        poll_interval=3600, pins=pins, **kwargs)


def sample(manager: ModelManager, name: str, labels: dict | None = None):
    return manager.metrics.registry.get_sample_value(name, labels or {})


def run(coro, timeout: float = 20):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def loaded(version: int, state: str, members: int = 1, metrics: dict | None = None) -> dict:
    return {"version": version, "state": state, "created": CREATED_ISO, "members": members,
            "metrics": metrics or {}, "engine": "fake"}


def ensemble(name, live=None, previous=None, versions=(), policy="latest", pinned=False) -> dict:
    return {"name": name, "live": live, "previous": previous, "policy": policy, "pinned": pinned,
            "versions": list(versions), "skipped": [], "skipped_count": 0}


# -- the manager ---------------------------------------------------------------------------------

def test_a_manager_before_its_first_poll_reports_nothing_and_stops_twice(tmp_path):
    manager = make(tmp_path)
    assert manager.generation == 0
    assert manager.status() == {"models": [], "skipped": [], "skipped_count": 0, "pins": VALID_PINS}
    assert manager.pins.state == PinsState("valid")
    run(manager.stop())
    run(manager.stop())  # a second stop is a no-op too


def test_versions_go_live_one_after_another_with_their_status_metrics_and_logs(tmp_path, fixed_time, swaps, caplog):
    caplog.set_level(logging.DEBUG, logger="service.lifecycle")
    write_version(tmp_path, "digits", 1, metrics={"accuracy": 0.8})
    store = ThreadNoting()
    loader = FakeLoader(delay=0.05)
    manager = make(tmp_path, loader, store)

    async def main():
        await manager.poll_once()
        assert sample(manager, "ensemble_reference_mutual_information_nats", {"model": "digits"}) == 0.0
        write_version(tmp_path, "digits", 2, members=2, metrics={"accuracy": 0.9},
                      reference={"mutual_information": 0.25})
        await manager.poll_once()
        (tmp_path / "digits" / "3").mkdir()  # no manifest: uncommitted
        await manager.poll_once()
        await manager.poll_once()  # nothing changed: nothing loaded, nothing counted again
        await manager.stop()

    run(main())
    assert loader.calls == [1, 2]
    assert {name for name, _ in loader.threads} == {"model-loader_0"}
    if os.getpriority(os.PRIO_PROCESS, 0) < LOADER_NICENESS:  # raising a nice value needs no privilege
        assert {nice for _, nice in loader.threads} == {LOADER_NICENESS}, "the loader's thread yields the CPU"
    assert store.threads == {"repository-scan_0"}
    assert manager.generation == 2 and swaps == [True, False]
    digits = manager.slots["digits"]
    assert (digits.live.version, digits.previous.version) == (2, 1)
    uncommitted = {"version": 3, "state": "uncommitted", "category": "uncommitted", "failed_at": NOW_ISO}
    versions = [uncommitted, loaded(2, "live", 2, {"accuracy": 0.9}), loaded(1, "previous", 1, {"accuracy": 0.8})]
    assert manager.status() == {"models": [ensemble("digits", 2, 1, versions)], "skipped": [], "skipped_count": 0,
                                "pins": VALID_PINS}
    assert manager.named_status("digits") == ensemble("digits", 2, 1, versions)  # no reasons by default
    assert manager.named_status("digits", detail=True)["versions"][0] == {**uncommitted, "reason": UNCOMMITTED_REASON}
    assert manager.readiness() == (True, "digits version 2 is live")
    assert manager.default_name() == "digits"
    model = {"model": "digits"}
    assert sample(manager, "ensemble_model_version", model) == 2
    assert sample(manager, "ensemble_model_members", model) == 2
    assert sample(manager, "ensemble_reference_mutual_information_nats", model) == 0.25
    assert sample(manager, "ensemble_abstained_rows_total", model) == 0.0
    assert sample(manager, "ensemble_model_reloads_total", {"model": "digits", "result": "success"}) == 2
    assert sample(manager, "ensemble_model_reloads_total", {"model": "digits", "result": "failure"}) == 1
    assert sample(manager, "ensemble_model_reload_failures_total", {"model": "digits", "reason": "uncommitted"}) == 1
    assert sample(manager, "ensemble_model_reload_failures_total", {"model": "digits", "reason": "checksum"}) == 0
    assert sample(manager, "ensemble_model_pinned_version", model) == 0
    assert sample(manager, "ensemble_ready") == 1 and sample(manager, "ensemble_pins_file_valid") == 1
    assert sample(manager, "ensemble_model_reload_duration_seconds_count", model) == 2
    assert 0.09 <= sample(manager, "ensemble_model_reload_duration_seconds_sum", model) < 5  # two loads of 0.05 s
    assert messages(caplog, "service.lifecycle.manager") == [
        "digits version 1 is live (engine: fake)",
        "digits version 2 is live (engine: fake)",
        f"version digits/3 is not served (uncommitted): {UNCOMMITTED_REASON}",
    ]


def test_client_errors_and_readiness_name_what_is_there(tmp_path, swaps):
    manager = make(tmp_path)
    long_name = "x" * 70
    with pytest.raises(ModelNotFound, match=rf"^no ensemble named '{'x' * 64}' in the repository \(known: none\)$"):
        manager.live(long_name)
    with pytest.raises(ModelNotFound, match=rf"^no ensemble named '{'x' * 64}' in the repository \(known: none\)$"):
        manager.named_status(long_name)
    with pytest.raises(NotReady, match=r"^the repository holds no ensemble yet$"):
        manager.default_name()
    assert manager.readiness() == (False, "the repository holds no ensemble yet")

    write_version(tmp_path, "alpha", 1)
    (tmp_path / "beta").mkdir()  # an ensemble with no version yet
    write_version(tmp_path, "gamma", 1)

    async def main():
        await manager.poll_once()
        write_version(tmp_path, "alpha", 2)
        await manager.poll_once()
        with pytest.raises(ModelNotFound, match=r"^no ensemble named 'nope' in the repository \(known: alpha, beta, "
                                                r"gamma\)$"):
            await manager.reload("nope")
        await manager.stop()

    run(main())
    alpha = manager.slots["alpha"]
    assert manager.get("alpha") is alpha.live and manager.get("alpha", 2) is alpha.live
    assert manager.get("alpha", 1) is alpha.previous and alpha.previous.version == 1
    with pytest.raises(ModelNotFound, match=r"^version 7 of 'alpha' is not loaded \(loaded: 2, 1\)$"):
        manager.get("alpha", 7)
    with pytest.raises(ModelNotFound, match=r"^version 3 of 'gamma' is not loaded \(loaded: 1\)$"):
        manager.get("gamma", 3)
    with pytest.raises(NotReady, match=rf"^ensemble 'beta' has no verified version yet: {re.escape(NO_VERSION)}$"):
        manager.live("beta")
    with pytest.raises(ModelNotFound, match=r"^no ensemble named 'nope' in the repository \(known: alpha, beta, gamma\)$"):
        manager.live("nope")
    with pytest.raises(ModelNotFound, match=re.escape(
            "the repository holds several ensembles (alpha, beta, gamma); set ENSEMBLE_DEFAULT_MODEL or call "
            "/v1/models/<name>:predict") + "$"):
        manager.default_name()
    assert manager.readiness() == (True, "alpha version 2 is live, gamma version 1 is live")
    assert sample(manager, "ensemble_ready") == 1


def test_the_default_model_decides_readiness(tmp_path, swaps):
    write_version(tmp_path, "alpha", 1)
    write_version(tmp_path, "gamma", 1)
    manager = make(tmp_path, default_model="gamma")
    run(manager.poll_once())
    run(manager.stop())
    assert manager.default_name() == "gamma"
    assert manager.readiness() == (True, "gamma version 1 is live")
    assert sample(manager, "ensemble_ready") == 1


def test_not_ready_says_why_for_each_ensemble_and_the_gauge_is_zero(tmp_path, fixed_time, swaps):
    write_version(tmp_path, "alpha", 1)
    (tmp_path / "beta").mkdir()
    (tmp_path / "delta" / "1").mkdir(parents=True)  # uncommitted, and nothing is live
    manager = make(tmp_path, FakeLoader(fail={1: [RuntimeError("boom")]}))
    run(manager.poll_once())
    run(manager.stop())
    assert manager.readiness() == (False, "; ".join([
        "alpha: version 1 failed its checks (load; the reason is in the log and at GET /models/alpha/status)",
        f"beta: {NO_VERSION}",
        "delta: version 1 failed its checks (uncommitted; the reason is in the log and at GET /models/delta/status)"]))
    assert sample(manager, "ensemble_ready") == 0 and sample(manager, "ensemble_pins_file_valid") == 1
    assert sample(manager, "ensemble_model_reload_failures_total", {"model": "delta", "reason": "uncommitted"}) == 1
    assert manager.status()["models"][2] == ensemble("delta", versions=[
        {"version": 1, "state": "uncommitted", "category": "uncommitted", "failed_at": NOW_ISO}])
    assert manager.status()["models"][0] == ensemble("alpha", versions=[
        {"version": 1, "state": "failed", "category": "load", "failed_at": NOW_ISO}])


def test_a_replica_that_never_read_good_pins_serves_nothing_and_refuses_pins(tmp_path, fixed_time, swaps, caplog):
    caplog.set_level(logging.DEBUG, logger="service.lifecycle")
    repo, state = tmp_path / "repo", tmp_path / "state"
    write_version(repo, "digits", 1)
    state.mkdir()
    (state / "pins.json").write_bytes(b"{")
    error = "pins.json is not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    manager = make(repo, pins=PinStore(state))

    async def main():
        await manager.poll_once()
        assert manager.readiness() == (False, (
            f"digits: the pins file cannot be trusted ({error}) and this replica never read good pins: it "
            "serves no version until the file is repaired or removed"))
        assert sample(manager, "ensemble_pins_file_valid") == 0 and sample(manager, "ensemble_ready") == 0
        assert manager.status()["pins"] == {"state": "unknown", "error": error, "since": NOW_ISO}
        with pytest.raises(Conflict, match="^" + re.escape(
                f"the pins file {state / 'pins.json'} is damaged ({error}); a pin written over it would drop the "
                'pins it holds for every replica: repair it (a JSON object such as {"digits": 3}, renamed into '
                "place) or remove it (no pins)") + "$"):
            await manager.pin("digits", 1)
        assert (state / "pins.json").read_bytes() == b"{"
        (state / "pins.json").write_bytes(b'{"digits": 1}')
        await manager.poll_once()
        await manager.stop()

    run(main())
    assert manager.live("digits").version == 1
    assert sample(manager, "ensemble_pins_file_valid") == 1 and sample(manager, "ensemble_ready") == 1
    assert messages(caplog, "service.lifecycle.pins") == [
        f"the pins file {state / 'pins.json'} is damaged ({error}) and no good pins were read before it: the "
        "versions the fleet pinned are unknown here; repair the file or remove it (no pins)",
        f"the pins file {state / 'pins.json'} is valid again: its pins are in force"]


def test_uncommitted_folders_below_the_live_version_are_not_failures_and_the_previous_comes_back(
        tmp_path, fixed_time, swaps):
    write_version(tmp_path, "digits", 2)
    loader = FakeLoader()
    manager = make(tmp_path, loader)
    failures = {"model": "digits", "reason": "uncommitted"}

    async def main():
        await manager.poll_once()
        (tmp_path / "digits" / "1").mkdir()  # an old, abandoned copy below the live version
        await manager.poll_once()
        assert sample(manager, "ensemble_model_reload_failures_total", failures) == 0
        assert manager.status_of("digits") == ensemble("digits", 2, None, [
            loaded(2, "live"), {"version": 1, "state": "uncommitted"}])
        (tmp_path / "digits" / "2" / "manifest.json").unlink()  # the live version's folder loses its manifest
        await manager.poll_once()
        assert sample(manager, "ensemble_model_reload_failures_total", failures) == 0
        assert manager.live("digits").version == 2
        write_version(tmp_path, "digits", 3)
        await manager.poll_once()
        write_version(tmp_path, "digits", 4)
        await manager.poll_once()
        assert (manager.live("digits").version, manager.slots["digits"].previous.version) == (4, 3)
        shutil.rmtree(tmp_path / "digits" / "4")  # withdrawn: the previous one, still loaded, at once
        await manager.poll_once()
        await manager.stop()

    run(main())
    assert loader.calls == [2, 3, 4]
    assert (manager.live("digits").version, manager.slots["digits"].previous.version) == (3, 4)
    assert manager.generation == 4 and swaps == [True, False, False, False]
    assert sample(manager, "ensemble_model_version", {"model": "digits"}) == 3


def test_admin_actions_answer_with_reasons_and_keep_pins_metrics_and_logs_right(tmp_path, fixed_time, swaps, caplog):
    caplog.set_level(logging.INFO, logger="service.lifecycle.manager")
    repo, state = tmp_path / "repo", tmp_path / "state"
    write_version(repo, "digits", 1)
    loader = FakeLoader(fail={3: [RuntimeError("boom 3"), RuntimeError("boom 3"), None],
                              4: [RuntimeError("boom 4")]})
    manager = make(repo, loader, PinStore(state))
    pins_file = state / "pins.json"
    failed3 = {"version": 3, "state": "failed", "category": "load", "failed_at": NOW_ISO, "reason": "RuntimeError: boom 3"}
    gauge = {"model": "digits"}

    async def main():
        await manager.poll_once()
        write_version(repo, "digits", 2)
        await manager.poll_once()
        write_version(repo, "digits", 3)
        await manager.poll_once()  # 3 fails the first time
        assert await manager.reload("digits") == ensemble("digits", 2, 1, [failed3, loaded(2, "live"), loaded(1, "previous")])

        caplog.clear()
        assert await manager.rollback("digits") == ensemble(
            "digits", 1, 2, [failed3, loaded(2, "previous"), loaded(1, "live")], policy=1, pinned=True)
        assert sample(manager, "ensemble_model_pinned_version", gauge) == 1
        assert pins_file.read_bytes() == b'{\n "digits": 1\n}'
        assert messages(caplog, "service.lifecycle.manager")[-1] == "digits rolled back to version 1, pinned"

        calls = list(loader.calls)
        assert await manager.pin("digits", 1) == ensemble(
            "digits", 1, 2, [failed3, loaded(2, "previous"), loaded(1, "live")], policy=1, pinned=True)
        assert loader.calls == calls, "pinning the live version loads nothing"
        assert messages(caplog, "service.lifecycle.manager")[-1] == "digits pinned to version 1"

        with pytest.raises(Conflict, match=r"^digits version 3 was not pinned: RuntimeError: boom 3$"):
            await manager.pin("digits", 3)  # fails again: the pin before it stays
        assert manager.pins.get("digits") == 1 and pins_file.read_bytes() == b'{\n "digits": 1\n}'
        assert manager.live("digits").version == 1

        assert (await manager.pin("digits", 3))["live"] == 3  # asked again, tried again: it loads now
        assert sample(manager, "ensemble_model_pinned_version", gauge) == 3
        assert await manager.pin("digits", 1) == ensemble(
            "digits", 1, 3, [loaded(3, "previous"), {"version": 2, "state": "available"}, loaded(1, "live")],
            policy=1, pinned=True)
        assert sample(manager, "ensemble_model_pinned_version", gauge) == 1
        assert messages(caplog, "service.lifecycle.manager")[-1] == "digits pinned to version 1"

        write_version(repo, "digits", 4)
        failed4 = {"version": 4, "state": "failed", "category": "load", "failed_at": NOW_ISO,
                   "reason": "RuntimeError: boom 4"}
        assert await manager.unpin("digits") == ensemble(
            "digits", 3, 1, [failed4, loaded(3, "live"), {"version": 2, "state": "available"}, loaded(1, "previous")])
        assert pins_file.read_bytes() == b"{}"
        assert sample(manager, "ensemble_model_pinned_version", gauge) == 0
        await manager.stop()

    run(main())
    assert loader.calls == [1, 2, 3, 3, 3, 4]


def test_a_load_finished_after_a_rollback_is_not_made_live_and_says_so(tmp_path, swaps, caplog):
    caplog.set_level(logging.WARNING, logger="service.lifecycle.manager")
    write_version(tmp_path, "digits", 1)
    release = threading.Event()
    loader = FakeLoader(gate={3: release})
    manager = make(tmp_path, loader)

    async def main():
        await manager.poll_once()
        write_version(tmp_path, "digits", 2)
        await manager.poll_once()
        write_version(tmp_path, "digits", 3)
        polling = asyncio.create_task(manager.poll_once())
        assert await asyncio.get_running_loop().run_in_executor(None, loader.entered.wait, 10)
        await manager.rollback("digits")
        release.set()
        await polling
        await manager.stop()

    run(main())
    assert manager.live("digits").version == 1
    assert messages(caplog, "service.lifecycle.manager") == [
        "digits rolled back to version 1, pinned",
        "digits version 3 loaded but not made live: pinned to version 1 meanwhile"]
    assert sample(manager, "ensemble_model_reloads_total", {"model": "digits", "result": "success"}) == 3


def test_a_rollback_while_a_pin_loads_wins_and_the_pin_is_refused_saying_why(tmp_path, swaps, caplog):
    caplog.set_level(logging.WARNING, logger="service.lifecycle.manager")
    for v in (1, 2, 3):
        write_version(tmp_path, "digits", v)
    release = threading.Event()
    loader = FakeLoader(gate={3: release})
    manager = make(tmp_path, loader, pins=PinStore(tmp_path / ".state"), policy=2)

    async def main():
        await manager.poll_once()  # 2 live
        manager.policy = "latest"
        await manager.pin("digits", 1)  # 1 live, 2 previous
        await manager.pin("digits", 2)  # a swap back: 2 live, 1 previous
        pinning = asyncio.create_task(manager.pin("digits", 3))
        assert await asyncio.get_running_loop().run_in_executor(None, loader.entered.wait, 10)
        await manager.rollback("digits")  # 1 live, pinned, while 3 loads
        release.set()
        with pytest.raises(Conflict, match=r"^digits version 3 was not pinned: a rollback pinned version 1 "
                                           r"while it loaded$"):
            await pinning
        await manager.stop()

    run(main())
    assert manager.live("digits").version == 1
    assert manager.pins.get("digits") == 1  # the fleet's pin is the rollback's
    assert sample(manager, "ensemble_model_pinned_version", {"model": "digits"}) == 1
    assert "digits pinned to version 3" not in messages(caplog, "service.lifecycle.manager")
    assert "digits version 3 loaded but not made live: pinned to version 1 meanwhile" in \
        messages(caplog, "service.lifecycle.manager")


@pytest.mark.parametrize("fails", [False, True])
def test_an_unpin_or_a_rollback_during_a_pin_stands_whether_its_load_works_or_fails(tmp_path, swaps, fails):
    for v in (1, 2, 3):
        write_version(tmp_path, "digits", v)
    release = threading.Event()
    loader = FakeLoader(gate={3: release}, fail={3: [RuntimeError("broken")] if fails else [None]})
    manager = make(tmp_path, loader, pins=PinStore(tmp_path / ".state"), policy=2)

    async def main(then):
        await manager.poll_once()  # 2 live
        manager.policy = "latest"
        await manager.pin("digits", 1)  # 1 live, 2 previous
        pinning = asyncio.create_task(manager.pin("digits", 3))
        assert await asyncio.get_running_loop().run_in_executor(None, loader.entered.wait, 10)
        said = await then()
        release.set()
        with pytest.raises(Conflict, match=rf"^digits version 3 was not pinned: {said} while it loaded$"):
            await pinning
        await manager.stop()

    async def rollback():  # back to 2, pinned
        await manager.rollback("digits")
        return "a rollback pinned version 2"

    run(main(rollback))
    assert manager.pins.get("digits") == 2 and manager.live("digits").version == 2  # not restored to 1

    release.clear()
    loader.entered.clear()
    loader.fail = {3: [RuntimeError("broken")] if fails else [None]}
    manager2 = make(tmp_path, loader, pins=PinStore(tmp_path / ".state2"), policy=2)
    manager = manager2

    async def unpin():
        manager.pins.set("digits", None)  # what unpin records first, before it polls
        return "it was unpinned"

    run(main(unpin))
    assert manager.pins.get("digits") is None  # the unpin stands


def test_a_version_loading_shows_as_loading_and_a_name_not_yet_refreshed_shows_as_found(tmp_path, swaps):
    write_version(tmp_path, "alpha", 1)
    write_version(tmp_path, "beta", 1)
    release = threading.Event()
    loader = FakeLoader(gate={1: release})
    manager = make(tmp_path, loader)

    async def main():
        polling = asyncio.create_task(manager.poll_once())
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, loader.entered.wait, 10)
            assert manager.status()["models"] == [
                ensemble("alpha", versions=[{"version": 1, "state": "loading"}]),
                ensemble("beta", versions=[{"version": 1, "state": "available"}])]
            assert manager.readiness() == (False, "alpha: version 1 is loading")
            started = time.monotonic()
            await manager.stop()  # does not wait for the load in progress
            assert time.monotonic() - started < 2
        finally:
            release.set()
            await polling

    run(main())
    assert manager.live("alpha").version == 1


def test_stop_does_not_wait_for_a_scan_in_progress(tmp_path):
    store = ThreadNoting()
    store.hold = threading.Event()
    manager = make(tmp_path, pins=store)

    async def main():
        polling = asyncio.create_task(manager.poll_once())
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, store.held.wait, 10)
            started = time.monotonic()
            await manager.stop()
            assert time.monotonic() - started < 2
        finally:
            store.hold.set()
            await polling

    run(main())


def test_the_poller_is_named_logs_a_failed_poll_and_goes_on_and_stop_ends_it(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="service.lifecycle.manager")
    manager = ModelManager(tmp_path, FakeLoader(), ServiceMetrics(CollectorRegistry()), poll_interval=0.01)
    failures = []

    async def broken_poll():
        failures.append(1)
        raise RuntimeError("scan broke")

    async def main():
        await manager.start()
        task = manager._task
        assert task.get_name() == "model-manager-poll"
        manager.poll_once = broken_poll
        while len(failures) < 2:
            await asyncio.sleep(0.01)
        await manager.stop()
        assert task.done() and manager._task is None

    run(main())
    records = [r for r in caplog.records if r.name == "service.lifecycle.manager"]
    assert records and {r.getMessage() for r in records} == {f"polling the repository {tmp_path} failed"}
    assert str(records[0].exc_info[1]) == "scan broke"


def test_one_ensembles_trouble_is_logged_and_the_others_still_load(tmp_path, swaps, caplog):
    caplog.set_level(logging.ERROR, logger="service.lifecycle.manager")
    write_version(tmp_path, "alpha", 1)
    write_version(tmp_path, "beta", 1)
    manager = make(tmp_path)
    refresh = manager._refresh

    async def troubled(slot):
        if slot.name == "alpha":
            raise RuntimeError("alpha broke")
        await refresh(slot)

    manager._refresh = troubled
    run(manager.poll_once())
    run(manager.stop())
    assert manager.live("beta").version == 1
    (record,) = [r for r in caplog.records if r.name == "service.lifecycle.manager"]
    assert record.getMessage() == "checking the versions of alpha failed"
    assert str(record.exc_info[1]) == "alpha broke"


def test_a_failed_version_is_logged_with_its_name_category_and_reason(tmp_path, swaps, caplog):
    caplog.set_level(logging.ERROR, logger="service.lifecycle.manager")
    write_version(tmp_path, "digits", 1)
    manager = make(tmp_path, FakeLoader(fail={1: [ValueError("bad weights")]}))
    run(manager.poll_once())
    run(manager.stop())
    assert messages(caplog, "service.lifecycle.manager") == [
        "version digits/1 is not served (load): ValueError: bad weights"]
    assert sample(manager, "ensemble_model_reload_failures_total", {"model": "digits", "reason": "load"}) == 1
    assert sample(manager, "ensemble_model_reloads_total", {"model": "digits", "result": "failure"}) == 1
    assert sample(manager, "ensemble_model_reloads_total", {"model": "digits", "result": "success"}) == 0


def test_an_ensemble_removed_from_the_repository_keeps_its_slot_with_no_folders(tmp_path, swaps):
    write_version(tmp_path, "digits", 1)
    manager = make(tmp_path)
    run(manager.poll_once())
    shutil.rmtree(tmp_path / "digits")
    run(manager.poll_once())
    run(manager.stop())
    assert manager.named_status("digits") == ensemble("digits", 1, None, [])
    assert manager.status() == {"models": [], "skipped": [], "skipped_count": 0, "pins": VALID_PINS}
    assert Snapshot().of("digits") == EnsembleScan()


# -- pins ----------------------------------------------------------------------------------------

def test_an_in_memory_pin_store_is_valid_and_unpins_what_is_not_pinned():
    store = PinStore()
    assert store.state == PinsState("valid", None, None) and store.path is None
    store.set("a", 2)
    store.set("b", 3)
    store.set("a", None)
    store.set("zzz", None)
    assert (store.get("a"), store.get("b"), store.refresh()) == (None, 3, {"b": 3})


def test_the_pins_file_is_sorted_and_indented_by_one_and_unpinning_the_unpinned_changes_nothing(tmp_path):
    store = PinStore(tmp_path)
    store.set("b", 2)
    store.set("a", 1)
    assert (tmp_path / "pins.json").read_bytes() == b'{\n "a": 1,\n "b": 2\n}'
    store.set("zzz", None)
    assert (tmp_path / "pins.json").read_bytes() == b'{\n "a": 1,\n "b": 2\n}'
    store.set("a", None)
    store.set("b", None)
    assert (tmp_path / "pins.json").read_bytes() == b"{}"


def test_damage_is_logged_once_per_error_since_its_first_sight_and_the_repair_once(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="service.lifecycle.pins")
    clock = iter([100.0, 200.0, 300.0, 400.0])
    monkeypatch.setattr(pins_module, "time", SimpleNamespace(time=lambda: next(clock)))
    path = tmp_path / "pins.json"
    fresh = PinStore(tmp_path)
    assert fresh.refresh() == {} and fresh.state == PinsState("valid")  # no file: no pins, nothing said
    store = PinStore(tmp_path)
    store.set("digits", 3)
    assert store.refresh() == {"digits": 3}
    path.write_bytes(b"[1]")
    assert store.refresh() == {"digits": 3}
    not_object = "pins.json is not a JSON object of {ensemble name: version}"
    assert store.state == PinsState("damaged", not_object, 100.0)
    path.write_bytes(b'{"digits": 0}')
    store.refresh()
    negative = f"the pin of 'digits' in pins.json is not a version number from 1 to {MAX_VERSION}: 0"
    assert store.state == PinsState("damaged", negative, 100.0), "since the first sight of damage"
    path.write_bytes(b'{"digits": 0}')  # the same damage, written again
    os.utime(path, ns=(1, 1))
    store.refresh()
    assert store.state == PinsState("damaged", negative, 100.0)
    path.write_bytes(b'{"digits": 4}')
    assert store.refresh() == {"digits": 4} and store.state == PinsState("valid")
    assert messages(caplog, "service.lifecycle.pins") == [
        f"the pins file {path} is damaged ({not_object}): keeping the pins read before it, {{'digits': 3}}",
        f"the pins file {path} is damaged ({negative}): keeping the pins read before it, {{'digits': 3}}",
        f"the pins file {path} is valid again: its pins are in force"]


def test_damage_after_good_empty_pins_keeps_none(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="service.lifecycle.pins")
    (tmp_path / "pins.json").write_bytes(b"{}")
    store = PinStore(tmp_path)
    assert store.refresh() == {} and store.state == PinsState("valid")
    (tmp_path / "pins.json").write_bytes(b"[ ]")
    store.refresh()
    assert messages(caplog, "service.lifecycle.pins") == [
        f"the pins file {tmp_path / 'pins.json'} is damaged (pins.json is not a JSON object of "
        "{ensemble name: version}): keeping the pins read before it, none"]


def test_an_unchanged_pins_file_is_not_read_again(tmp_path, monkeypatch):
    reads = []
    real = pins_module.read_nofollow
    monkeypatch.setattr(pins_module, "read_nofollow", lambda *a: reads.append(1) or real(*a))
    (tmp_path / "pins.json").write_bytes(b'{"digits": 2}')
    store = PinStore(tmp_path)
    assert store.refresh() == {"digits": 2} and store.refresh() == {"digits": 2}
    assert len(reads) == 1


def test_a_pins_folder_that_cannot_be_reached_is_refused_with_the_systems_words(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    store = PinStore(tmp_path / "loop")
    assert store.refresh() == {}
    assert store.state.state == "unknown"
    assert store.state.error == "pins.json cannot be read: Too many levels of symbolic links"


def test_a_link_and_a_folder_are_refused_by_what_they_are(tmp_path):
    (tmp_path / "good.json").write_bytes(b'{"digits": 1}')
    (tmp_path / "pins.json").symlink_to(tmp_path / "good.json")
    store = PinStore(tmp_path)
    store.refresh()
    assert store.state.error == "pins.json is a symbolic link"
    (tmp_path / "pins.json").unlink()
    (tmp_path / "pins.json").mkdir()
    store.refresh()
    assert store.state.error == "pins.json is not a regular file"
    assert unreadable(OSError(errno.EIO, "Input/output error")) == "cannot be read: Input/output error"


def test_a_pin_refused_while_the_file_is_being_read_or_where_it_cannot_be_written(tmp_path, monkeypatch):
    store = PinStore(tmp_path)
    release, reading = threading.Event(), threading.Event()
    real = pins_module.read_nofollow

    def slow_read(*args):
        reading.set()
        release.wait(10)
        return real(*args)

    (tmp_path / "pins.json").write_bytes(b"{}")
    monkeypatch.setattr(pins_module, "read_nofollow", slow_read)
    poll = threading.Thread(target=store.refresh)
    poll.start()
    try:
        assert reading.wait(10)
        with pytest.raises(PinsNotShared, match=rf"^the pins file {re.escape(str(tmp_path / 'pins.json'))} is being "
                                                r"read; try again$"):
            store.set("digits", 1)
    finally:
        release.set()
        poll.join(10)

    (tmp_path / "afile").write_bytes(b"")
    blocked = PinStore(tmp_path / "afile")
    with pytest.raises(PinsNotShared, match="^" + re.escape(
            f"the pin cannot be recorded in {tmp_path / 'afile' / 'pins.json'}, where every replica reads it (File "
            "exists); make that folder writable, or set ENSEMBLE_STATE_DIR to a folder every replica shares and may "
            "write") + "$") as refused:
        blocked.set("digits", 1)
    assert not isinstance(refused.value, PinsDamaged)


def test_pins_file_refusals_say_exactly_what_is_wrong():
    def refusal(data: bytes) -> str:
        with pytest.raises(ValueError) as caught:
            parse(data)
        return str(caught.value)

    assert refusal(b'{"digits": 1') == "pins.json is not JSON: Expecting ',' delimiter: line 1 column 13 (char 12)"
    assert refusal(b"[1]") == "pins.json is not a JSON object of {ensemble name: version}"
    assert refusal(b'{"%s": 1}' % (b"X" * 100)) == f"pins.json pins {'X' * 64!r}, which is not an ensemble name"
    assert parse(b'{"a": %d}' % MAX_VERSION) == {"a": MAX_VERSION}
    over = "the pin of 'a' in pins.json is not a version number from 1 to " + str(MAX_VERSION)
    assert refusal(b'{"a": %d}' % (MAX_VERSION + 1)) == f"{over}: {MAX_VERSION + 1}"
    assert refusal(b'{"a": {"k": 1}}') == f"{over}: dict"
    assert refusal(b'{"a": [1]}') == f"{over}: list"


def test_a_pins_value_is_shown_in_at_most_forty_characters():
    assert short({"k": 1}) == "dict" and short([1, 2]) == "list" and short(None) == "None"
    assert short("s" * 38) == "'" + "s" * 38 + "'"  # 40 characters: whole
    assert short("s" * 39) == "'" + "s" * 36 + "..."  # 41: cut to 37 and marked
    assert short("s" * 40) == "'" + "s" * 36 + "..."


# -- status, snapshot, pacing, memory ----------------------------------------------------------

def test_times_are_iso_8601_in_utc():
    assert when(0) == "1970-01-01T00:00:00+00:00"
    assert when(86400.5) == "1970-01-02T00:00:00.500000+00:00"


def test_a_version_stamp_lists_every_file_and_folder_relative_to_the_version_and_skips_dangling_links(tmp_path):
    vdir = tmp_path / "digits" / "1"
    (vdir / "members" / "m").mkdir(parents=True)
    for i in range(6):
        (vdir / "members" / "m" / f"f{i}").write_bytes(b"x" * (i + 1))
        (vdir / "members" / "m" / f"gone{i}").symlink_to(tmp_path / "nowhere")
    (vdir / "manifest.json").write_bytes(b"{}")
    names = ["manifest.json", "members", "members/m", *[f"members/m/f{i}" for i in range(6)]]
    expected = tuple(sorted((n, os.stat(vdir / n).st_mtime_ns, os.stat(vdir / n).st_size) for n in names))
    assert version_stamp(VersionDir("1", 1, vdir, True)) == expected


def test_the_pacer_refuses_a_duty_above_one_and_sleeps_not_for_no_work():
    for duty in (0, 1.5, 2):
        with pytest.raises(ValueError, match=r"^duty_cycle must be in \(0, 1\]$"):
            Pacer(duty)
    slept = []
    pacer = Pacer(0.5, clock=lambda: 5.0, sleep=slept.append)
    pacer.step()
    assert slept == []


def test_the_loader_thread_priority_failure_is_logged(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="service.lifecycle.pacing")

    def refuse(*args):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    pacing.lower_thread_priority()
    assert messages(caplog, "service.lifecycle.pacing") == ["loader priority unchanged: [Errno 1] Operation not permitted"]


def test_the_young_generation_threshold_is_raised_and_the_others_kept():
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        memory.tune_garbage_collector()
        assert gc.get_threshold() == (memory.YOUNG_GENERATION_THRESHOLD, 11, 12) == (20_000, 11, 12)
    finally:
        gc.set_threshold(*before)


def test_the_collection_after_a_swap_logs_its_milliseconds(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="service.lifecycle.memory")
    readings = iter([1.0, 1.5])
    monkeypatch.setattr(memory, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    memory.release_garbage(first=False)
    assert messages(caplog, "service.lifecycle.memory") == ["garbage collection after swap: 500.0 ms"]
