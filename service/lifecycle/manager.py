"""The model manager: the version state machine of every ensemble in the repository.

It polls the repository, verifies and loads a chosen version in a worker thread (off the
serving path), and swaps it in with one reference assignment: a request that fetched the live
ensemble keeps using that object to the end, so it is answered entirely by one version. A
version that fails any check is recorded with its reason and not tried again until its files
change. Pins and rollbacks override the policy; the rules of their races with a load in
progress are in `rollback` and `_load`.

No file-system work happens on the event loop: each poll scans the repository and re-reads the
pins in a thread (`service.lifecycle.snapshot`), then applies what it found on the loop, where
every state change (a swap, a failure recorded) happens. The status routes answer from the last
poll's snapshot; only the admin actions look at the repository again, through a poll or a scan
in the same thread. One exception: an admin action that pins writes the small pins file on the
loop (`_record_pin`), so that a rollback's pin and swap happen with no await between them. On an
object store the write is a round trip, made off the loop with the pin already in force here
(a load or a poll that runs meanwhile sees it).

A replica that never read good pins (it started while the pins file was damaged) loads no
version and is not ready: it cannot know which versions the fleet pinned, and serving the
newest could undo an operator's rollback. It says why (readiness, GET /models, the log) and
loads as soon as the file is repaired or removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Protocol

from service.background import cancel
from service.engines.base import Ensemble
from service.errors import Conflict, ModelNotFound, NotReady
from service.lifecycle.memory import release_garbage
from service.lifecycle.pacing import Pacer, lower_thread_priority
from service.lifecycle.pins import PinsNotShared, PinStore
from service.lifecycle.slots import Failure, ModelSlot
from service.lifecycle.snapshot import Snapshot, take, version_stamp
from service.lifecycle.status import ensemble_status, pins_status, skips_status
from service.metrics import ServiceMetrics
from contract.integrity import verify_checksums
from contract.store import StoreError
from contract.layout import VersionDir, choose_version, scan_model
from contract.manifest import Manifest, failure_of, read_manifest
from contract.tasks import EPISTEMIC

log = logging.getLogger(__name__)


class Loader(Protocol):
    """Makes a verified version servable: (manifest, folder, pace) -> a warmed Ensemble, or an
    exception that says why not (`service.engines.loader.EngineLoader` is the real one)."""

    def __call__(self, manifest: Manifest, path: Path, pace: Callable[[], None]) -> Ensemble: ...


UNCOMMITTED_REASON = (
    "no manifest.json: the folder is not a committed version. Publish atomically: stage in a "
    "hidden folder, write the manifest last, rename into place (ensemble-train does)")


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
        sync: Callable[[], object] | None = None,
    ):
        self.repository = Path(repository)
        self.loader = loader
        self.metrics = metrics
        self.policy = policy
        self.poll_interval = poll_interval
        self.default_model = default_model
        self.pins = pins or PinStore()
        self.loader_duty_cycle = loader_duty_cycle
        # An object-store repository: brings its new versions into `repository` (contract.remote.Mirror)
        # before each scan; why it last failed, or None.
        self.sync = sync
        self.store_error: StoreError | None = None
        self._store_failed_at = 0.0
        self.slots: dict[str, ModelSlot] = {}
        self.generation = 0  # counts the swaps: what derives from the loaded versions can be kept until it changes
        self.on_swap: list[Callable[[], None]] = []  # called after each swap, on the loop
        self._first_swap = True
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader",
                                           initializer=lower_thread_priority)
        # The repository's file-system work (scans, stamps, the pins file): never on the loop,
        # and never queued behind a load of tens of seconds.
        self._scanner = ThreadPoolExecutor(1, thread_name_prefix="repository-scan")
        self.snapshot = Snapshot()  # the last poll's look at the repository
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # -- serving side -------------------------------------------------------------------------

    def live(self, name: str) -> Ensemble:
        """The live ensemble of `name`; raises ModelNotFound or NotReady for the client."""
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            raise ModelNotFound(f"no ensemble named {name[:64]!r} in the repository (known: {known})")
        if slot.live is None:
            raise NotReady(f"ensemble {name!r} has no verified version yet: {self._why_not(slot)}")
        return slot.live

    def get(self, name: str, version: int | None = None) -> Ensemble:
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
            raise NotReady("the repository holds no ensemble yet")
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
        if self.store_error is not None:
            return False, f"the repository's object store cannot be read: {self.store_error.meaning}"
        if not self.slots:
            return False, "the repository holds no ensemble yet"
        return False, "; ".join(f"{s.name}: {self._why_not(s)}" for s in self.slots.values())

    def _why_not(self, slot: ModelSlot) -> str:
        if not self.pins.state.known:
            return (f"the pins file cannot be trusted ({self.pins.state.error}) and this replica never "
                    "read good pins: it serves no version until the file is repaired or removed")
        if slot.loading is not None:
            return f"version {slot.loading} is loading"
        if slot.failures:
            v = max(slot.failures)
            # the category only: this text reaches clients (503s, /readyz); the reason is logged
            return (f"version {v} failed its checks ({slot.failures[v].category}; the reason is in the "
                    f"log and at GET /models/{slot.name}/status)")
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
        self._scanner.shutdown(wait=False, cancel_futures=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once()
            except Exception:  # a poll must never kill the poller; the next one tries again
                log.exception("polling the repository %s failed", self.repository)

    async def poll_once(self) -> None:
        """Scan the repository (in a thread) and bring every ensemble to the version its policy
        chooses (on the loop)."""
        async with self._lock:
            failed = {name: frozenset(slot.failures) for name, slot in self.slots.items()}
            self.snapshot = await self._off_loop(self._look, failed)
            self.metrics.pins_file_valid.set(1 if self.pins.state.state == "valid" else 0)
            for name in self.snapshot.names:
                try:
                    await self._refresh(self._slot_of(name))
                except Exception:  # one ensemble's trouble must not keep the others from their versions
                    log.exception("checking the versions of %s failed", name)
        self.metrics.ready.set(1 if self.readiness()[0] else 0)

    def _look(self, failed: dict[str, frozenset[int]]) -> Snapshot:
        """A poll's file-system work, in the scan thread: the pins file, the repository, memory."""
        self.pins.refresh()
        self.metrics.update_process()
        self._sync_store()
        return take(self.repository, failed)

    def _sync_store(self) -> None:
        """An object-store repository's new versions downloaded and checked; a store that fails
        leaves the loaded versions serving, is logged once, and is tried again at the next poll."""
        if self.sync is None:
            return
        try:
            self.sync()
        except StoreError as exc:
            if self.store_error is None or exc.meaning != self.store_error.meaning:  # once per kind of failure
                log.error("the repository's object store cannot be read (loaded versions keep serving; "
                          "trying again every %g s): %s", self.poll_interval, exc)
                self._store_failed_at = time.monotonic()
            self.store_error = exc
            return
        if self.store_error is not None:  # a warning: it closes the error above in logs kept at warning
            log.warning("the repository's object store answers again, after %.0f s",
                        time.monotonic() - self._store_failed_at)
        self.store_error = None

    async def _off_loop(self, work: Callable, *args):
        """`work(*args)` in the scan thread: file-system work never blocks the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._scanner, work, *args)

    def policy_of(self, name: str) -> Literal["latest"] | int:
        """A pin set through the admin routes, else the configured policy."""
        return self.pins.get(name) or self.policy

    async def _refresh(self, slot: ModelSlot) -> None:
        scan = self.snapshot.of(slot.name)
        folders, stamps = scan.folders, scan.stamps
        # A failed version is retried only once its files have changed.
        for number, failure in list(slot.failures.items()):
            if number not in folders or stamps.get(number) != failure.stamp:
                del slot.failures[number]
        # Under the repository contract a numbered folder appears complete, manifest included;
        # one without is a copy in progress or an abandoned one: reported once, never loaded.
        live_now = slot.live.version if slot.live is not None else 0
        for number, folder in folders.items():
            if not folder.committed and number > live_now and number not in slot.failures:
                self._record_failure(slot, number, UNCOMMITTED_REASON, stamps[number], "uncommitted")
        versions = {n: v for n, v in folders.items() if v.committed}
        policy = self.policy_of(slot.name)
        self.metrics.model_pinned_version.labels(slot.name).set(0 if policy == "latest" else policy)
        if not self.pins.state.known:  # the fleet's pins are unknown here: serve nothing (module docstring)
            return
        while True:
            chosen = choose_version(versions, policy, rejected=slot.failures)
            if chosen is None or (slot.live is not None and chosen == slot.live.version):
                return
            if slot.previous is not None and chosen == slot.previous.version:
                self.swap(slot, slot.previous)  # still loaded and verified: instant
                return
            if await self._load(slot, versions[chosen]):
                return

    # -- admin --------------------------------------------------------------------------------

    def _slot_of(self, name: str) -> ModelSlot:
        """The slot of a name the repository holds, made at its first sight."""
        if name not in self.slots:
            self.slots[name] = ModelSlot(name)
            self.metrics.register_model(name)
        return self.slots[name]

    def _slot(self, name: str) -> ModelSlot:
        """The slot of a name a client sent: 404 unless the last poll found it (the name never
        reaches the file system)."""
        if name not in self.slots:
            known = ", ".join(sorted(self.slots)) or "none"
            raise ModelNotFound(f"no ensemble named {name[:64]!r} in the repository (known: {known})")
        return self.slots[name]

    async def reload(self, name: str) -> dict:
        """Check the repository now (admin), instead of at the next poll: an ensemble published
        since the last poll is found."""
        await self.poll_once()
        self._slot(name)
        return self.status_of(name, detail=True)

    async def rollback(self, name: str) -> dict:
        """Make the previous version live again at once, and pin it until told otherwise.

        It does not wait for a load in progress (that can take tens of seconds): pin and swap
        happen with no await between them, and a load that finishes later sees the pin and
        does not go live (`_load`)."""
        slot = self._slot(name)
        if slot.previous is None:
            raise Conflict(f"{name} has no previous version loaded to roll back to")
        target = slot.previous
        await self._record_pin(name, target.version)  # every replica follows within a poll
        if slot.live is not target:  # a poll during a store's write may have swapped to it already
            self.swap(slot, target)
        self.metrics.model_pinned_version.labels(name).set(target.version)
        log.warning("%s rolled back to version %d, pinned", name, target.version)
        return self.status_of(name, detail=True)

    async def pin(self, name: str, version: int) -> dict:
        """Serve `version` from now on, whatever is published later; loads it if needed. A version
        that fails its checks is refused (409) and the live version stays."""
        async with self._lock:
            slot = self._slot(name)
            versions = {v.version: v for v in await self._off_loop(scan_model, self.repository, name)}
            if version not in versions or not versions[version].committed:
                raise ModelNotFound(f"{name} has no committed version {version}")
            before = self.pins.get(name)
            await self._record_pin(name, version)  # first: a pin that cannot be shared changes nothing
            if slot.live is None or slot.live.version != version:
                if slot.previous is not None and slot.previous.version == version:
                    self.swap(slot, slot.previous)
                else:
                    slot.failures.pop(version, None)  # asked for explicitly: try it again
                    loaded = await self._load(slot, versions[version])
                    now = self.pins.get(name)
                    if now != version:  # a rollback or an unpin while it loaded: theirs stands
                        said = "it was unpinned" if now is None else f"a rollback pinned version {now}"
                        raise Conflict(f"{name} version {version} was not pinned: {said} while it loaded")
                    if not loaded:
                        await self._record_pin(name, before)
                        raise Conflict(f"{name} version {version} was not pinned: "
                                       f"{slot.failures[version].reason}")
            self.metrics.model_pinned_version.labels(name).set(version)
        log.warning("%s pinned to version %d", name, version)
        return self.status_of(name, detail=True)

    async def unpin(self, name: str) -> dict:
        """Back to the configured policy (normally: the newest good version)."""
        self._slot(name)
        await self._record_pin(name, None)
        await self.poll_once()
        return self.status_of(name, detail=True)

    async def _record_pin(self, name: str, version: int | None) -> None:
        """Pin (or unpin, None) where every replica reads it; 409 if it cannot be shared. A pins
        file is written here, with no await (a rollback's pin and swap stay together); a store's
        pins object takes a round trip, made off the loop, with the pin in force here first, so
        a load that finishes meanwhile sees it."""
        if self.pins.remote is None:
            try:
                self.pins.set(name, version)
            except PinsNotShared as exc:
                raise Conflict(str(exc)) from None
            return
        before = self.pins.get(name)
        self.pins.hold(name, version)
        try:
            await asyncio.to_thread(self.pins.set, name, version)
        except PinsNotShared as exc:
            self.pins.hold(name, before)
            raise Conflict(str(exc)) from None

    async def _load(self, slot: ModelSlot, version: VersionDir) -> bool:
        """Verify and load one version in a worker thread; swap it in on success, unless a pin
        to another version was set meanwhile (by a rollback: a pin records itself before its
        load, so only a later pin differs)."""
        stamp = await self._off_loop(version_stamp, version)  # first: a change while it loads is a change
        slot.loading = version.version
        started = time.monotonic()
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
        if pinned is not None and pinned != ensemble.version:  # rolled back meanwhile
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

    def _verify_and_load(self, version: VersionDir) -> Ensemble:
        pacer = Pacer(self.loader_duty_cycle)
        manifest = read_manifest(version.path)
        verify_checksums(version.path, manifest)
        pacer.step()
        return self.loader(manifest, version.path, pacer.step)

    def swap(self, slot: ModelSlot, ensemble: Ensemble) -> None:
        """Make `ensemble` live; the old live version becomes the previous one, older ones go."""
        dropped = slot.previous if slot.previous is not ensemble else None
        slot.previous, slot.live = slot.live, ensemble
        self.generation += 1
        for listener in self.on_swap:
            listener()
        self.metrics.model_version.labels(slot.name).set(ensemble.version)
        self.metrics.model_members.labels(slot.name).set(len(ensemble.manifest.members))
        self.metrics.reference_mutual_information.labels(slot.name).set(
            ensemble.signature.heads[0].uncertainty_reference.get("mutual_information", 0.0))
        self.metrics.abstained_rows.labels(slot.name)  # at 0 from the start, so rates see the first
        for head in ensemble.signature.heads:
            score = EPISTEMIC[head.task]
            self.metrics.reference_head_uncertainty.labels(slot.name, head.name, score).set(
                head.uncertainty_reference.get(score, 0.0))
            self.metrics.head_abstained_rows.labels(slot.name, head.name)
        log.info("%s version %d is live (engine: %s)", slot.name, ensemble.version, ensemble.engine.kind)
        del dropped
        release_garbage(first=self._first_swap)
        self._first_swap = False

    # -- reporting ----------------------------------------------------------------------------

    def status(self) -> dict:
        """For GET /models, from the last poll's snapshot: every ensemble and each of its version
        folders with its state, the repository's entries that are not ensembles (with why: the
        first of them, and their count), and whether the pins in force are the pins file's."""
        snapshot = self.snapshot
        store = ({"store": {"readable": self.store_error is None,
                            **({"error": self.store_error.meaning} if self.store_error else {})}}
                 if self.sync is not None else {})
        return {"models": [self.status_of(name) for name in snapshot.names],
                **skips_status(snapshot.skipped), "pins": pins_status(self.pins.state), **store}

    def status_of(self, name: str, detail: bool = False) -> dict:
        """One ensemble's versions and their states, and the entries skipped in its folder, as
        the last poll saw them; with `detail` (admins), why each failed version failed."""
        scan = self.snapshot.of(name)
        return ensemble_status(self.slots.get(name, ModelSlot(name)), list(scan.folders.values()),
                               self.policy_of(name), self.pins.get(name) is not None, scan.skipped, detail)

    def named_status(self, name: str, detail: bool = False) -> dict:
        """status_of a name a client sent: 404 for an ensemble the last poll did not find; with
        `detail`, for the admin route, the reasons."""
        self._slot(name)
        return self.status_of(name, detail)
