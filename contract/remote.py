"""The repository contract on an object store (contract.store): where a version's objects live,
how a publisher claims a number and commits it, and how a reader brings the committed versions
into a local folder that then follows the folder contract (contract.layout) exactly.

Objects: `<name>/<version>/.claim`, `<name>/<version>/members/<member>/<files>`, the report
files beside them, and `<name>/<version>/manifest.json`.

- A publisher lists the ensemble once, creates `<name>/<N>/.claim` create-only for the next
  number (the one after on `AlreadyExists`: another publisher has it), uploads every file, and
  creates the manifest last, create-only. A version is committed exactly when its manifest
  exists; no rename is needed. A killed upload leaves a claim, some files and no manifest: never
  served, and removed by a later publish once older than STALE_CLAIM_SECONDS (a publisher checks
  its claim is still its own before it commits).
- A reader lists the whole prefix once per poll, downloads each committed version it does not
  have into `<cache>/.incoming-<pid>/<name>/<version>`, checks every member file against the manifest
  there, and renames the folder to `<cache>/<name>/<version>`. The cache is then a folder
  repository whose versions appear complete, and the server reads it as it reads any folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from contract.integrity import ChecksumError, verify_checksums
from contract.layout import MANIFEST_FILE, is_valid_name, is_version_folder, next_version
from contract.manifest import Manifest, ManifestError, ManifestV2, read_manifest
from contract.store import AlreadyExists, Entry, NotFound, RemoteStore, StoreError

log = logging.getLogger(__name__)

CLAIM_FILE = ".claim"
INCOMING_DIR = ".incoming"
REMOVING_DIR = ".removing"
MIRROR_MARKER = ".mirror-of"
# A claim without a manifest this old is a publisher that died: a later publish removes its
# objects. A day: far longer than an upload, and than the clocks of two machines disagree.
STALE_CLAIM_SECONDS = 24 * 3600
_CLAIM_ATTEMPTS = 20


@dataclass
class RemoteVersion:
    """One version number's objects in a listing: committed when its manifest is there."""

    name: str
    version: int
    entries: list[Entry] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        return any(e.key == self.key(MANIFEST_FILE) for e in self.entries)

    def key(self, rel: str) -> str:
        return f"{self.name}/{self.version}/{rel}"

    def files(self) -> list[tuple[str, Entry]]:
        """(path inside the version, entry) of every object but the claim."""
        prefix = f"{self.name}/{self.version}/"
        return [(e.key[len(prefix):], e) for e in self.entries if e.key != self.key(CLAIM_FILE)]


def cache_name(url: str) -> str:
    """A folder name for a store location's local mirror: readable, and unique per location."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", url.split("://", 1)[-1]).strip("-")[:60]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def versions_of(entries: Iterable[Entry]) -> dict[str, dict[int, RemoteVersion]]:
    """The listing's objects grouped by ensemble name and version number. Keys that are not
    `<name>/<version>/<path>` with a valid name and number (the store's probe objects,
    anything else) are left out, as a folder reader leaves out what is not a version."""
    found: dict[str, dict[int, RemoteVersion]] = {}
    for entry in entries:
        parts = entry.key.split("/", 2)
        if len(parts) < 3 or not is_valid_name(parts[0]) or not is_version_folder(parts[1]) or not _safe(parts[2]):
            continue
        name, number = parts[0], int(parts[1])
        found.setdefault(name, {}).setdefault(number, RemoteVersion(name, number)).entries.append(entry)
    return found


def _safe(rel: str) -> bool:
    """A path inside a version that stays inside it when written under a folder."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def upload_version(store: RemoteStore, name: str, staged: Path,
                   manifest_for: Callable[[int, int | None], Manifest | ManifestV2],
                   report: Callable[[str], None] = log.info) -> Manifest | ManifestV2:
    """Publish the version staged in the local folder `staged` (members and report files, no
    manifest) as the next number of `name`: claim, upload, manifest last. Returns the manifest
    `manifest_for(number, replaces)` made; StoreError if the store failed (nothing committed)."""
    number, replaces, claimed = _claim(store, name, report)
    files = sorted(p for p in staged.rglob("*") if p.is_file() and p != staged / MANIFEST_FILE)
    for path in files:
        store.write(f"{name}/{number}/{path.relative_to(staged).as_posix()}", path)
    manifest = manifest_for(number, replaces)
    # The claim must still be this publisher's: one that took longer than STALE_CLAIM_SECONDS
    # may have been removed as abandoned, and its number claimed again by another publisher.
    try:
        still = store.read(f"{name}/{number}/{CLAIM_FILE}")[1]
    except NotFound:
        still = None
    if still != claimed:
        raise StoreError(f"the claim of {store.url}/{name}/{number} was removed or taken over while this "
                         "version uploaded (an upload longer than the stale-claim limit?); nothing was committed")
    store.create(f"{name}/{number}/{MANIFEST_FILE}", (manifest.model_dump_json(indent=2) + "\n").encode())
    return manifest


def _claim(store: RemoteStore, name: str, report: Callable[[str], None]) -> tuple[int, int | None, str | None]:
    """The next free version number of `name`, claimed create-only, the newest committed one,
    and the claim's ETag."""
    for _ in range(_CLAIM_ATTEMPTS):
        versions = versions_of(store.list(f"{name}/")).get(name, {})
        remove_stale_claims(store, versions.values(), report)
        committed = [n for n, v in versions.items() if v.committed]
        number = next_version(versions)
        claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
        try:
            etag = store.create(f"{name}/{number}/{CLAIM_FILE}", claim)
        except AlreadyExists:  # another publisher took it between the listing and the claim
            continue
        return number, max(committed, default=None), etag
    raise StoreError(f"could not claim a version number of {name} in {store.url} after {_CLAIM_ATTEMPTS} tries")


def remove_stale_claims(store: RemoteStore, versions: Iterable[RemoteVersion], report: Callable[[str], None],
                        older_than: float = STALE_CLAIM_SECONDS) -> list[int]:
    """Delete the objects of uncommitted versions whose claim is older than `older_than` seconds
    (their publisher died mid-upload); the numbers removed."""
    removed = []
    now = time.time()
    for version in versions:
        if version.committed:
            continue
        claims = [e for e in version.entries if e.key == version.key(CLAIM_FILE)]
        if not claims or claims[0].modified is None or now - claims[0].modified < older_than:
            continue
        for entry in version.entries:
            if entry.key != version.key(CLAIM_FILE):
                store.delete(entry.key)
        store.delete(version.key(CLAIM_FILE))  # last: a listing never shows files without their claim
        report(f"removed the unfinished upload {store.url}/{version.name}/{version.version} "
               f"(claimed {now - claims[0].modified:.0f} s ago, never committed)")
        removed.append(version.version)
    return removed


@dataclass
class SyncResult:
    """What one look at the store did: versions downloaded, refused (with why), removed."""

    downloaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)


class Mirror:
    """Keeps `cache` (a local folder repository) holding the committed versions of the store:
    one listing per `sync`, downloads only of versions it does not hold, every member file
    checked before a version appears in the cache. `name` keeps to one ensemble (one listing of
    its prefix); `latest_only` keeps its newest committed version alone (what a trainer needs to
    compare with).

    The cache is the mirror's own: a marker file names the store, and a folder that holds
    anything without it (a real repository given as the cache by mistake) is refused before
    anything in it is touched. Several processes may share one cache (a server's workers)."""

    def __init__(self, store: RemoteStore, cache: Path, name: str | None = None, latest_only: bool = False,
                 per_sync: int | None = None, first: Callable[[str], int | None] = lambda name: None):
        self.store, self.cache, self.name, self.latest_only = store, Path(cache), name, latest_only
        # At most `per_sync` downloads per ensemble in one sync (None: all), newest first after
        # `first(name)` (a pinned version): a server is ready once the version it serves is in,
        # and the older ones follow at the next syncs.
        self.per_sync, self.first = per_sync, first
        # A version refused once is not downloaded again until its objects change (their ETags).
        self._refused: dict[tuple[str, int], tuple] = {}

    def _wanted(self) -> dict[str, dict[int, RemoteVersion]]:
        listing = versions_of(self.store.list(f"{self.name}/" if self.name else ""))
        if self.name is not None:
            listing = {n: v for n, v in listing.items() if n == self.name}
        wanted = {name: {n: v for n, v in versions.items() if v.committed} for name, versions in listing.items()}
        if self.latest_only:
            wanted = {name: {max(v): v[max(v)]} for name, v in wanted.items() if v}
        return wanted

    def sync(self) -> SyncResult:
        """One listing; new committed versions downloaded and checked; versions no longer in the
        store removed from the cache. StoreError if the store fails (a listing, a download: tried
        again at the next sync) or the cache cannot be used; a version whose objects do not make
        a valid version (files that do not match the manifest, keys that cannot be files) is
        refused (in the result) and not downloaded again until its objects change."""
        try:
            self._claim_cache()
            listed_at = time.time()
            remote = self._wanted()
            result = SyncResult()
            for name, versions in remote.items():
                pinned = self.first(name)
                order = sorted(versions, key=lambda n: (n != pinned, -n))
                budget = self.per_sync if self.per_sync is not None else len(order)
                for number in order:
                    if budget <= 0:
                        break
                    budget -= self._bring(versions[number], result)
            self._remove_gone(remote, listed_at, result)
            return result
        except OSError as exc:  # the cache's own disk: not the store's fault, tried again next time
            raise StoreError(f"cannot use the local cache {self.cache}: {exc}",
                             "the local cache folder cannot be used") from None

    def _claim_cache(self) -> None:
        """The marker naming the store, written into an empty or new cache; StoreError if the
        folder holds something else or mirrors another store. Incoming folders of processes
        that are gone are removed."""
        marker = self.cache / MIRROR_MARKER
        if marker.is_file():
            if marker.read_text().strip() != self.store.url:
                raise StoreError(f"{self.cache} mirrors {marker.read_text().strip()!r}, not {self.store.url}: give "
                                 "each store a cache folder of its own", "the cache folder mirrors another store")
        else:
            self.cache.mkdir(parents=True, exist_ok=True)
            if any(p.name != MIRROR_MARKER for p in self.cache.iterdir()):
                raise StoreError(f"{self.cache} is not empty and is not a mirror of {self.store.url}: it is not "
                                 "used, so nothing in it is removed; give the store a cache folder of its own",
                                 "the cache folder is not a mirror")
            marker.write_text(self.store.url + "\n")
        for incoming in self.cache.glob(f"{INCOMING_DIR}-*"):
            pid = incoming.name.rpartition("-")[2]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(incoming, ignore_errors=True)

    def _bring(self, version: RemoteVersion, result: SyncResult) -> int:
        """Download one committed version unless the cache holds it or it was refused as it is;
        1 if it was tried (downloaded or refused), else 0."""
        name, number = version.name, version.version
        if (self.cache / name / str(number) / MANIFEST_FILE).is_file():
            return 0
        stamp = tuple(sorted((e.key, e.etag) for e in version.entries))
        if self._refused.get((name, number)) == stamp:
            return 0
        try:
            self._download(version)
            result.downloaded.append(f"{name}/{number}")
        except NotFound:  # deleted since the listing: the next listing says what is there
            return 0
        except (ManifestError, ChecksumError, BadVersion) as exc:  # the version's own fault
            self._refused[(name, number)] = stamp
            result.refused[f"{name}/{number}"] = str(exc)
            log.error("version %s/%d in %s is not served: %s", name, number, self.store.url, exc)
        return 1

    def _remove_gone(self, remote: dict[str, dict[int, RemoteVersion]], listed_at: float,
                     result: SyncResult) -> None:
        """Versions of the cache that this sync's listing does not have. One that appeared after
        the listing (another process's download) is left alone; one removed is first renamed
        aside, so a half-removed version never looks complete."""
        for name_dir in (p for p in self._children(self.cache) if is_valid_name(p.name)):
            if self.name is not None and name_dir.name != self.name:
                continue
            for version_dir in (p for p in self._children(name_dir) if is_version_folder(p.name)):
                if int(version_dir.name) in remote.get(name_dir.name, {}):
                    continue
                try:
                    if version_dir.stat().st_mtime >= listed_at:  # renamed into place since the listing
                        continue
                    aside = self.cache / f"{REMOVING_DIR}-{os.getpid()}-{name_dir.name}-{version_dir.name}"
                    os.rename(version_dir, aside)
                except FileNotFoundError:  # another process removed it first
                    continue
                shutil.rmtree(aside, ignore_errors=True)
                result.removed.append(f"{name_dir.name}/{version_dir.name}")

    @staticmethod
    def _children(folder: Path) -> list[Path]:
        try:
            return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
        except FileNotFoundError:
            return []

    def _download(self, version: RemoteVersion) -> None:
        # One incoming folder per process: the workers of one server share the cache, and the
        # first to finish a version renames it into place (the others' copies are dropped).
        incoming = self.cache / f"{INCOMING_DIR}-{os.getpid()}" / version.name / str(version.version)
        shutil.rmtree(incoming, ignore_errors=True)  # what an interrupted download left
        incoming.mkdir(parents=True)  # an OSError here is the cache's: sync raises it as such
        try:
            for rel, entry in version.files():
                target = incoming / rel
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if target.exists():
                        raise FileExistsError(rel)
                except OSError as exc:  # keys that cannot all be files (`a` and `a/b`)
                    raise BadVersion(f"its object {entry.key} cannot be a file of a version folder ({exc})") from None
                self.store.download(entry.key, target)
            manifest = read_manifest(incoming)
            verify_checksums(incoming, manifest)
            final = self.cache / version.name / str(version.version)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.utime(incoming)  # its time is when it appeared here (see _remove_gone)
            try:
                os.rename(incoming, final)
            except OSError:
                if not (final / MANIFEST_FILE).is_file():  # not another worker's finished copy
                    raise
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
            try:
                incoming.parent.rmdir()
            except OSError:
                pass


class BadVersion(Exception):
    """A version's objects cannot make a version folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
