"""The model manager: owns the live version of every ensemble in the repository.

It polls the repository, verifies and loads a chosen version in a worker thread (off the
serving path), and swaps it in with one reference assignment: a request that fetched the live
ensemble keeps using that object to the end, so it is answered entirely by one version. A
version that fails any check is recorded with its reason and not tried again until its files
change.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

from service.background import cancel
from service.errors import Conflict, ModelNotFound, NotReady
from service.metrics import ServiceMetrics
from service.repository import (
    Manifest,
    VersionDir,
    choose_version,
    failure_of,
    read_manifest,
    scan_model,
    scan_names,
    verify_checksums,
)

log = logging.getLogger(__name__)


def version_stamp(version: VersionDir) -> tuple:
    """What must change before a failed version is tried again: (path, mtime, size) of its files."""
    entries = []
    for path in sorted(version.path.rglob("*")):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append((path.relative_to(version.path).as_posix(), st.st_mtime_ns, st.st_size))
    return tuple(entries)


def _lower_priority() -> None:
    """Loading competes with serving for two cores; the loader thread yields the CPU first
    (Linux threads have their own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)
    except (AttributeError, OSError) as exc:
        log.debug("loader priority unchanged: %s", exc)


class Pacer:
    """Keeps a background job to a share of the time: each `step()` sleeps in proportion to the
    work done since the previous one. Loading a version is ~1 s of CPU per 5 members; on two
    busy cores, unpaced, it takes that time from the requests being served."""

    def __init__(self, duty_cycle: float, clock=time.monotonic, sleep=time.sleep):
        if not 0 < duty_cycle <= 1:
            raise ValueError("duty_cycle must be in (0, 1]")
        self.ratio = (1 - duty_cycle) / duty_cycle
        self.clock, self.sleep = clock, sleep
        self.last = clock()

    def step(self) -> None:
        worked = self.clock() - self.last
        if self.ratio and worked > 0:
            self.sleep(min(worked * self.ratio, MAX_PACE_SLEEP))
        self.last = self.clock()


# Young collections every 20,000 allocations instead of 700. A one-row request allocates a few
# hundred objects (JSON, lists, futures), so the default collected every few requests.
# Measured at 32 connections, default ensemble, 3 interleaved rounds: 10-17% less CPU per
# request, and 9-18% more requests/s. Only cyclic garbage waits for a collection; the rest
# is freed at once.
YOUNG_GENERATION_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Fewer young collections while serving (see YOUNG_GENERATION_THRESHOLD)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def release_garbage(first: bool) -> None:
    """Free a dropped version without stalling the event loop.

    TensorFlow and Keras leave hundreds of thousands of long-lived objects; a full collection
    over them stalls the loop for 100-300 ms. After the first version is live, everything that
    exists (TensorFlow's modules, the first version) is frozen out of the collector's sight, so
    later collections only walk what later loads created: the loaded versions and the garbage
    of the dropped one. (The first version's objects stay frozen: one version's memory, once.)
    """
    started = time.perf_counter()
    gc.collect()
    if first:
        gc.freeze()
    log.debug("garbage collection after swap: %.1f ms", (time.perf_counter() - started) * 1000)


@dataclass
class Failure:
    reason: str
    stamp: tuple
    at: float
    category: str = "invalid"


UNCOMMITTED_REASON = (
    "no manifest.json: the folder is not a committed version. Publish atomically: stage in a "
    "hidden folder, write the manifest last, rename into place (ensemble-train does)")


@dataclass
class ModelSlot:
    """The state of one ensemble name: live and previous versions, and versions that failed."""

    name: str
    live: object | None = None  # service.ensemble.Ensemble; typed loosely to keep TF out
    previous: object | None = None
    failures: dict[int, Failure] = field(default_factory=dict)
    loading: int | None = None


Loader = Callable[[Manifest, Path, Callable[[], None]], object]  # (manifest, folder, pace)
PINS_FILE = "pins.json"
LOADER_NICENESS = 10
MAX_PACE_SLEEP = 2.0


class PinStore:
    """Versions pinned through the admin routes, by ensemble name.

    In memory, and also in `<folder>/pins.json` when a folder is given: then every worker
    process reads the same pins at each poll, and a restarted service keeps them (a rollback
    must not be undone by a restart)."""

    def __init__(self, folder: Path | None = None):
        self.path = Path(folder) / PINS_FILE if folder is not None else None
        self._pins: dict[str, int] = {}
        self._seen: int | None = None  # mtime_ns of the file when last read
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.refresh()

    def refresh(self) -> dict[str, int]:
        """Re-read the file if another process changed it; the pins now in force."""
        if self.path is None:
            return self._pins
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._pins, self._seen = {}, None
            return self._pins
        if mtime != self._seen:
            try:
                raw = json.loads(self.path.read_text())
                self._pins = {str(k): int(v) for k, v in raw.items() if int(v) >= 1}
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                log.error("ignoring unreadable pins file %s: %s", self.path, exc)
            self._seen = mtime
        return self._pins

    def get(self, name: str) -> int | None:
        return self._pins.get(name)

    def set(self, name: str, version: int | None) -> None:
        """Pin `name` to `version`, or unpin it with None; written atomically."""
        pins = dict(self.refresh())
        if version is None:
            pins.pop(name, None)
        else:
            pins[name] = version
        if self.path is not None:
            tmp = self.path.with_name(f".{PINS_FILE}.{os.getpid()}")
            tmp.write_text(json.dumps(pins, sort_keys=True))
            os.replace(tmp, self.path)
            self._seen = self.path.stat().st_mtime_ns
        self._pins = pins


class ModelManager:
    """Polls the repository and keeps one verified, warmed version live per ensemble name."""

    def __init__(
        self,
        repository: Path,
        loader: Loader,
        metrics: ServiceMetrics,
        policy: Literal["latest"] | int = "latest",
        poll_interval: float = 2.0,
        default_model: str | None = None,
        pins: PinStore | None = None,
        loader_duty_cycle: float = 1.0,
    ):
        self.repository = Path(repository)
        self.loader = loader
        self.metrics = metrics
        self.policy = policy
        self.poll_interval = poll_interval
        self.default_model = default_model
        self.pins = pins or PinStore()
        self.loader_duty_cycle = loader_duty_cycle
        self.slots: dict[str, ModelSlot] = {}
        self._first_swap = True
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader", initializer=_lower_priority)
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # -- serving side -------------------------------------------------------------------------

    def live(self, name: str):
        """The live ensemble of `name`; raises ModelNotFound or NotReady for the client."""
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            raise ModelNotFound(f"no ensemble named {name!r} in the repository (known: {known})")
        if slot.live is None:
            raise NotReady(f"ensemble {name!r} has no verified version yet: {self._why_not(slot)}")
        return slot.live

    def get(self, name: str, version: int | None = None):
        """The live ensemble, or a specific loaded version (the live or the previous one)."""
        ensemble = self.live(name)
        if version is None or version == ensemble.version:
            return ensemble
        previous = self.slots[name].previous
        if previous is not None and previous.version == version:
            return previous
        loaded = [str(e.version) for e in (ensemble, previous) if e is not None]
        raise ModelNotFound(f"version {version} of {name!r} is not loaded (loaded: {', '.join(loaded)})")

    def default_name(self) -> str:
        """The ensemble /predict serves: the configured one, else the only one there is."""
        if self.default_model:
            return self.default_model
        if len(self.slots) == 1:
            return next(iter(self.slots))
        if not self.slots:
            raise NotReady(f"the repository {self.repository} holds no ensemble yet")
        raise ModelNotFound(
            f"the repository holds several ensembles ({', '.join(sorted(self.slots))}); set "
            "ENSEMBLE_DEFAULT_MODEL or call /v1/models/<name>:predict"
        )

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): the configured default ensemble is live, or, with none configured,
        at least one ensemble is (one broken ensemble must not take the others out of service)."""
        if self.default_model:
            try:
                ensemble = self.live(self.default_model)
            except (ModelNotFound, NotReady) as exc:
                return False, str(exc)
            return True, f"{ensemble.name} version {ensemble.version} is live"
        live = [s.live for s in self.slots.values() if s.live is not None]
        if live:
            return True, ", ".join(f"{e.name} version {e.version} is live" for e in live)
        if not self.slots:
            return False, f"the repository {self.repository} holds no ensemble yet"
        return False, "; ".join(f"{s.name}: {self._why_not(s)}" for s in self.slots.values())

    def _why_not(self, slot: ModelSlot) -> str:
        if slot.loading is not None:
            return f"version {slot.loading} is loading"
        if slot.failures:
            v = max(slot.failures)
            return f"version {v} failed: {slot.failures[v].reason}"
        return "no committed version (a version folder needs its manifest.json)"

    # -- loading side -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what is there now, then keep polling in the background."""
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever(), name="model-manager-poll")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once()
            except Exception:  # a poll must never kill the poller; the next one tries again
                log.exception("polling the repository %s failed", self.repository)

    async def poll_once(self) -> None:
        """Scan the repository and bring every ensemble to the version its policy chooses."""
        async with self._lock:
            self.pins.refresh()
            for name in scan_names(self.repository):
                await self._refresh(self._slot(name))
        self.metrics.ready.set(1 if self.readiness()[0] else 0)
        self.metrics.update_process()

    def policy_of(self, name: str) -> Literal["latest"] | int:
        """A pin set through the admin routes, else the configured policy."""
        return self.pins.get(name) or self.policy

    async def _refresh(self, slot: ModelSlot) -> None:
        folders = {v.version: v for v in scan_model(self.repository, slot.name)}
        # A failed version is retried only once its files have changed.
        for number, failure in list(slot.failures.items()):
            if number not in folders or version_stamp(folders[number]) != failure.stamp:
                del slot.failures[number]
        # Under the repository contract a numbered folder appears complete, manifest included;
        # one without is a copy in progress or an abandoned one: reported once, never loaded.
        live_now = getattr(slot.live, "version", 0)
        for number, folder in folders.items():
            if not folder.committed and number > live_now and number not in slot.failures:
                self._record_failure(slot, number, UNCOMMITTED_REASON, version_stamp(folder), "uncommitted")
        versions = {n: v for n, v in folders.items() if v.committed}
        policy = self.policy_of(slot.name)
        self.metrics.model_pinned_version.labels(slot.name).set(0 if policy == "latest" else policy)
        while True:
            live_version = getattr(slot.live, "version", None)
            chosen = choose_version(versions, policy, rejected=slot.failures)
            if chosen is None or chosen == live_version:
                return
            if slot.previous is not None and chosen == slot.previous.version:
                self.swap(slot, slot.previous)  # still loaded and verified: instant
                return
            if await self._load(slot, versions[chosen]):
                return

    # -- admin --------------------------------------------------------------------------------

    def _slot(self, name: str) -> ModelSlot:
        if name not in self.slots and name in scan_names(self.repository):
            self.slots[name] = ModelSlot(name)
            self.metrics.register_model(name)
        if name not in self.slots:
            known = ", ".join(sorted(self.slots)) or "none"
            raise ModelNotFound(f"no ensemble named {name!r} in the repository (known: {known})")
        return self.slots[name]

    async def reload(self, name: str) -> dict:
        """Check the repository now (admin), instead of at the next poll."""
        self._slot(name)
        await self.poll_once()
        return self.status_of(name)

    async def rollback(self, name: str) -> dict:
        """Make the previous version live again at once, and pin it until told otherwise.

        It does not wait for a load in progress (that can take tens of seconds): pin and swap
        happen with no await between them, and a load that finishes later sees the pin and
        does not go live (`_load`)."""
        slot = self._slot(name)
        if slot.previous is None:
            raise Conflict(f"{name} has no previous version loaded to roll back to")
        target = slot.previous
        self.pins.set(name, target.version)
        self.swap(slot, target)
        self.metrics.model_pinned_version.labels(name).set(target.version)
        log.warning("%s rolled back to version %d, pinned", name, target.version)
        return self.status_of(name)

    async def pin(self, name: str, version: int) -> dict:
        """Serve `version` from now on, whatever is published later; loads it if needed. A version
        that fails its checks is refused (409) and the live version stays."""
        async with self._lock:
            slot = self._slot(name)
            versions = {v.version: v for v in scan_model(self.repository, name)}
            if version not in versions or not versions[version].committed:
                raise ModelNotFound(f"{name} has no committed version {version}")
            if slot.live is None or slot.live.version != version:
                if slot.previous is not None and slot.previous.version == version:
                    self.swap(slot, slot.previous)
                else:
                    slot.failures.pop(version, None)  # asked for explicitly: try it again
                    if not await self._load(slot, versions[version], pinning=True):
                        raise Conflict(f"{name} version {version} was not pinned: "
                                       f"{slot.failures[version].reason}")
            self.pins.set(name, version)
            self.metrics.model_pinned_version.labels(name).set(version)
        log.warning("%s pinned to version %d", name, version)
        return self.status_of(name)

    async def unpin(self, name: str) -> dict:
        """Back to the configured policy (normally: the newest good version)."""
        self._slot(name)
        self.pins.set(name, None)
        await self.poll_once()
        return self.status_of(name)

    async def _load(self, slot: ModelSlot, version: VersionDir, pinning: bool = False) -> bool:
        """Verify and load one version in a worker thread; swap it in on success, unless a pin
        to another version was set meanwhile (by a rollback; `pinning`: the caller is pinning
        this very version)."""
        slot.loading = version.version
        started = time.monotonic()
        stamp = version_stamp(version)
        try:
            ensemble = await asyncio.get_running_loop().run_in_executor(
                self._loader, self._verify_and_load, version)
        except Exception as exc:
            reason, category = failure_of(exc)
            self._record_failure(slot, version.version, reason, stamp, category)
            return False
        finally:
            slot.loading = None
        self.metrics.reload_duration.labels(slot.name).observe(time.monotonic() - started)
        self.metrics.reloads.labels(slot.name, "success").inc()
        pinned = self.pins.get(slot.name)
        if not pinning and pinned is not None and pinned != ensemble.version:  # rolled back meanwhile
            log.warning("%s version %d loaded but not made live: pinned to version %d meanwhile",
                        slot.name, ensemble.version, pinned)
            return True
        self.swap(slot, ensemble)
        return True

    def _record_failure(self, slot: ModelSlot, version: int, reason: str, stamp: tuple, category: str) -> None:
        slot.failures[version] = Failure(reason, stamp, time.time(), category)
        self.metrics.reloads.labels(slot.name, "failure").inc()
        self.metrics.reload_failures.labels(slot.name, category).inc()
        log.error("version %s/%d is not served (%s): %s", slot.name, version, category, reason)

    def _verify_and_load(self, version: VersionDir):
        pacer = Pacer(self.loader_duty_cycle)
        manifest = read_manifest(version.path)
        verify_checksums(version.path, manifest)
        pacer.step()
        return self.loader(manifest, version.path, pacer.step)

    def swap(self, slot: ModelSlot, ensemble) -> None:
        """Make `ensemble` live; the old live version becomes the previous one, older ones go."""
        dropped = slot.previous if slot.previous is not ensemble else None
        slot.previous, slot.live = slot.live, ensemble
        self.metrics.model_version.labels(slot.name).set(ensemble.version)
        self.metrics.model_members.labels(slot.name).set(len(ensemble.manifest.members))
        log.info("%s version %d is live (engine: %s)", slot.name, ensemble.version, getattr(ensemble, "engine", "?"))
        del dropped
        release_garbage(first=self._first_swap)
        self._first_swap = False

    # -- reporting ----------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """Every ensemble and each of its version folders with its state, for GET /models."""
        return [self.status_of(name) for name in scan_names(self.repository)]

    def status_of(self, name: str) -> dict:
        """One ensemble's versions and their states."""
        slot = self.slots.get(name, ModelSlot(name))
        live = getattr(slot.live, "version", None)
        previous = getattr(slot.previous, "version", None)
        versions = []
        for v in reversed(scan_model(self.repository, name)):
            entry: dict = {"version": v.version}
            if v.version == live:
                entry["state"] = "live"
            elif v.version == slot.loading:
                entry["state"] = "loading"
            elif v.version in slot.failures:
                failure = slot.failures[v.version]
                entry["state"] = "uncommitted" if failure.category == "uncommitted" else "failed"
                entry.update(reason=failure.reason, category=failure.category,
                             failed_at=datetime.fromtimestamp(failure.at, timezone.utc).isoformat())
            elif not v.committed:
                entry["state"] = "uncommitted"
            elif v.version == previous:
                entry["state"] = "previous"
            else:
                entry["state"] = "available"
            loaded = {live: slot.live, previous: slot.previous}.get(v.version)
            if loaded is not None:
                m = loaded.manifest
                entry.update(created=m.created.isoformat(), members=len(m.members), metrics=m.metrics)
                if getattr(loaded, "engine", None):  # what computes it: tflite or tensorflow
                    entry["engine"] = loaded.engine
            versions.append(entry)
        policy = self.policy_of(name)
        return {"name": name, "live": live, "previous": previous, "policy": policy,
                "pinned": self.pins.get(name) is not None, "versions": versions}
