"""The repository contract on an object store (contract.store): where a version's objects live,
how a publisher claims a number and commits it, and how a reader brings the committed versions
into a local folder that then follows the folder contract (contract.layout) exactly.

Objects: `<name>/<version>/.claim`, `<name>/<version>/members/<member>/<files>`, the report
files beside them, and `<name>/<version>/manifest.json`.

- A publisher lists the ensemble once, creates `<name>/<N>/.claim` create-only for the next
  number (the one after on `AlreadyExists`: another publisher has it), uploads every file, and
  creates the manifest last, create-only. A version is committed exactly when its manifest
  exists; no rename is needed. A killed upload leaves a claim, some files and no manifest: never
  served, and removed by a later publish once older than STALE_CLAIM_SECONDS.
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
from contract.store import AlreadyExists, Entry, RemoteStore, StoreError

log = logging.getLogger(__name__)

CLAIM_FILE = ".claim"
INCOMING_DIR = ".incoming"
# A claim without a manifest this old is a publisher that died: a later publish removes its objects.
STALE_CLAIM_SECONDS = 3600
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
    number, replaces = _claim(store, name, report)
    files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    for path in files:
        store.write(f"{name}/{number}/{path.relative_to(staged).as_posix()}", path)
    manifest = manifest_for(number, replaces)
    store.create(f"{name}/{number}/{MANIFEST_FILE}", (manifest.model_dump_json(indent=2) + "\n").encode())
    return manifest


def _claim(store: RemoteStore, name: str, report: Callable[[str], None]) -> tuple[int, int | None]:
    """The next free version number of `name`, claimed create-only, and the newest committed one."""
    for _ in range(_CLAIM_ATTEMPTS):
        versions = versions_of(store.list(f"{name}/")).get(name, {})
        remove_stale_claims(store, versions.values(), report)
        committed = [n for n, v in versions.items() if v.committed]
        number = next_version(versions)
        claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
        try:
            store.create(f"{name}/{number}/{CLAIM_FILE}", claim)
        except AlreadyExists:  # another publisher took it between the listing and the claim
            continue
        return number, max(committed, default=None)
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
    compare with)."""

    def __init__(self, store: RemoteStore, cache: Path, name: str | None = None, latest_only: bool = False):
        self.store, self.cache, self.name, self.latest_only = store, Path(cache), name, latest_only
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
        again at the next sync) or the cache cannot be written; a version whose files do not
        match its manifest is refused (in the result) and not downloaded again until they change."""
        remote = self._wanted()
        result = SyncResult()
        for name, versions in remote.items():
            for number, version in sorted(versions.items()):
                if (self.cache / name / str(number) / MANIFEST_FILE).is_file():
                    continue
                stamp = tuple(sorted((e.key, e.etag) for e in version.entries))
                if self._refused.get((name, number)) == stamp:
                    continue
                try:
                    self._download(version)
                    result.downloaded.append(f"{name}/{number}")
                except OSError as exc:  # the cache's own disk: not the version's fault, retried next time
                    raise StoreError(f"cannot write the local cache {self.cache}: {exc}",
                                     "the local cache folder cannot be written") from None
                except (ManifestError, ChecksumError) as exc:  # the version's own fault: not retried as it is
                    self._refused[(name, number)] = stamp
                    result.refused[f"{name}/{number}"] = str(exc)
                    log.error("version %s/%d in %s is not served: %s", name, number, self.store.url, exc)
        for name_dir in (p for p in self._children(self.cache) if is_valid_name(p.name)):
            if self.name is not None and name_dir.name != self.name:
                continue
            for version_dir in (p for p in self._children(name_dir) if is_version_folder(p.name)):
                if int(version_dir.name) not in remote.get(name_dir.name, {}):
                    shutil.rmtree(version_dir, ignore_errors=True)
                    result.removed.append(f"{name_dir.name}/{version_dir.name}")
        return result

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
        incoming.mkdir(parents=True)
        try:
            for rel, entry in version.files():
                target = incoming / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self.store.download(entry.key, target)
            manifest = read_manifest(incoming)
            verify_checksums(incoming, manifest)
            final = self.cache / version.name / str(version.version)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(incoming, final)
            except OSError:
                if not (final / MANIFEST_FILE).is_file():  # not another worker's finished copy
                    raise
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
