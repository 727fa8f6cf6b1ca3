"""A compiled version as bytes: its frozen TensorFlow graph and, when it converted, its
TensorFlow Lite model; the file they are kept in, and the cache of those files. No TensorFlow
here: a server whose versions run on TensorFlow Lite reads these without importing it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from service.engines.base import LoadError
from contract.files import lock_file, lock_within, read_nofollow, write_atomically
from contract.manifest import Manifest

log = logging.getLogger(__name__)

# 2: graph size in the header, then the TensorFlow Lite model; 3: three outputs (with the scores)
_MAGIC = b"ensemble-frozen-graph/3\n"


def tensorflow_version() -> str:
    """The installed TensorFlow's version, read from its package metadata (not by importing it)."""
    for dist in ("tensorflow-cpu", "tensorflow", "tf-nightly-cpu", "tf-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


@dataclass(frozen=True)
class FrozenGraph:
    """A serialized GraphDef and the names of its input and its three outputs (average, members,
    scores)."""

    graph_def: bytes
    input: str
    outputs: tuple[str, str, str]


_NAMED_MAGIC = b"ensemble-named/1\n"


@dataclass(frozen=True)
class NamedCompiled:
    """What compiling a format-2 version yields (service.engines.named.compile_named): the
    version loaded, checked and warmed once, and its members' function as a TensorFlow Lite
    model when it converted and answered the same (`lite`); else None, and `reason`, why it
    runs on TensorFlow."""

    lite: bytes | None
    reason: str = ""

    def to_bytes(self) -> bytes:
        return _NAMED_MAGIC + json.dumps({"reason": self.reason}).encode() + b"\n" + (self.lite or b"")

    @classmethod
    def from_bytes(cls, data: bytes, where: object) -> "NamedCompiled":
        if not data.startswith(_NAMED_MAGIC):
            raise LoadError(f"{where} is not a compiled format-2 version")
        header, _, rest = data[len(_NAMED_MAGIC):].partition(b"\n")
        try:
            reason = json.loads(header)["reason"]
        except (ValueError, KeyError, TypeError):
            raise LoadError(f"{where} has a damaged header") from None
        return cls(rest or None, str(reason))

    def write(self, path: Path) -> None:
        Path(path).write_bytes(self.to_bytes())


def compiled_from_bytes(data: bytes, where: object) -> "CompiledVersion | NamedCompiled":
    """A compilation's bytes as the kind they say they are (a format-2 version's, or a frozen graph's)."""
    if data.startswith(_NAMED_MAGIC):
        return NamedCompiled.from_bytes(data, where)
    return CompiledVersion.from_bytes(data, where)


def read_compiled(path: Path) -> "CompiledVersion | NamedCompiled":
    return compiled_from_bytes(Path(path).read_bytes(), path)


@dataclass(frozen=True)
class CompiledVersion:
    """What compiling a version yields: its frozen graph, and the same ensemble as a TensorFlow
    Lite model when it converted and agreed with the members (`lite`; else None)."""

    frozen: FrozenGraph
    lite: bytes | None = None

    def to_bytes(self) -> bytes:
        graph = self.frozen
        header = json.dumps({"input": graph.input, "outputs": list(graph.outputs),
                             "graph_bytes": len(graph.graph_def)}).encode()
        return _MAGIC + header + b"\n" + graph.graph_def + (self.lite or b"")

    @classmethod
    def from_bytes(cls, data: bytes, where: object) -> "CompiledVersion":
        if not data.startswith(_MAGIC):
            raise LoadError(f"{where} is not a frozen ensemble graph")
        header, _, rest = data[len(_MAGIC):].partition(b"\n")
        meta = json.loads(header)
        size = meta["graph_bytes"]
        if len(rest) < size:
            raise LoadError(f"{where} is truncated: {len(rest)} bytes where the graph alone has {size}")
        return cls(FrozenGraph(rest[:size], meta["input"], tuple(meta["outputs"])), rest[size:] or None)

    def write(self, path: Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def read(cls, path: Path) -> "CompiledVersion":
        return cls.from_bytes(Path(path).read_bytes(), path)


class CompileCache:
    """Compiled versions kept in a folder, so a restarted server (or another worker) reads a
    version's compilation instead of compiling it again in a child process.

    An entry is named by the hash of the version's manifest (the one the loader was given, in
    its canonical JSON: every member file's sha256 is in it) and the TensorFlow version, and is
    used only if it carries the HMAC the server wrote with it: a keyed digest of the manifest's
    hash and the entry's bytes, under a key kept in the folder (`.key`, readable by the server's
    user only). So an entry that a server did not write, or one moved to another version's
    name, is ignored and the version compiled again (checking costs one sha256 of the entry;
    compiling costs seconds). The folder is created private to the server's user (0700) and not
    used when anyone else may write it; files are opened without following symbolic links and
    written under unpredictable names, then renamed into place. The newest `keep` entries are kept. Processes sharing the folder
    (`--workers N`) compile a version one at a time (`get_or_compile`): the others wait for the
    first and read its entry. What is put under a manifest must be compiled from files verified
    against that manifest, as they were read (the loader compiles from a private copy made
    while verifying), so that an entry holds what its manifest describes."""

    def __init__(self, folder: Path, keep: int = 16):
        self.folder, self.keep = Path(folder), keep
        self._key: bytes | None = None

    def _private_folder(self) -> bool:
        """Create the folder (0700) if need be; whether it is ours and nobody else's to write."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.folder)
        except OSError as exc:
            log.warning("compile cache %s not usable: %s", self.folder, exc)
            return False
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() \
                or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("compile cache %s not used: it must be a folder of this user's that no one "
                        "else may write (chmod 700)", self.folder)
            return False
        return True

    def key(self) -> bytes | None:
        """The folder's HMAC key, made on first use; None if the folder cannot be trusted."""
        if self._key is None and self._private_folder():
            path = self.folder / ".key"
            try:
                if not path.exists():  # made whole, then linked into place: never read half-written
                    fd, tmp = tempfile.mkstemp(prefix=".key.", dir=self.folder)
                    try:
                        with os.fdopen(fd, "wb") as f:
                            f.write(secrets.token_bytes(32))
                            f.flush()
                            os.fsync(f.fileno())
                        os.link(tmp, path)
                    except FileExistsError:  # another worker's key won: use it
                        pass
                    finally:
                        os.unlink(tmp)
                key = read_nofollow(path)
            except OSError as exc:
                log.warning("compile cache %s not used: %s", self.folder, exc)
                return None
            if len(key) == 32:
                self._key = key
        return self._key

    def path_of(self, manifest: Manifest) -> Path:
        return self.folder / f"{self._version_digest(manifest)[:32]}.graph"

    @staticmethod
    def _version_digest(manifest: Manifest) -> str:
        digest = hashlib.sha256(manifest.model_dump_json().encode())
        digest.update(tensorflow_version().encode())
        return digest.hexdigest()

    def _mac(self, key: bytes, manifest: Manifest, data: bytes) -> bytes:
        return hmac.new(key, self._version_digest(manifest).encode() + data, hashlib.sha256).digest()

    def get(self, manifest: Manifest) -> CompiledVersion | None:
        key = self.key()
        if key is None:
            return None
        path = self.path_of(manifest)
        try:
            stored = read_nofollow(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring unreadable compiled graph %s: %s", path, exc)
            return None
        mac, data = stored[:32], stored[32:]
        if len(stored) < 32 or not hmac.compare_digest(mac, self._mac(key, manifest, data)):
            log.warning("ignoring compiled graph %s: not written by a server of this cache for this "
                        "version (its digest does not match); compiling the version again", path)
            return None
        try:
            return compiled_from_bytes(data, path)
        except (ValueError, KeyError, LoadError) as exc:  # damaged: compile again
            log.warning("ignoring unreadable compiled graph %s: %s", path, exc)
            return None

    def get_or_compile(self, manifest: Manifest, compile: Callable[[], CompiledVersion],
                       wait_seconds: float, give_up: Callable[[], bool] = lambda: False) -> CompiledVersion:
        """The cached compilation of the version, or compile()'s, cached. While another process (or
        thread) compiles the same version, wait for it, up to wait_seconds, and take its entry:
        N workers that see a new version at once compile it once, not N times side by side.
        While waiting, raise LoadError as soon as give_up() (the server is stopping)."""
        compiled = self.get(manifest)
        if compiled is not None:
            return compiled
        with self._compiling(manifest, wait_seconds, give_up):
            compiled = self.get(manifest)  # compiled by whoever held the lock before us
            if compiled is None:
                compiled = compile()
                self.put(manifest, compiled)
        return compiled

    @contextmanager
    def _compiling(self, manifest: Manifest, wait_seconds: float,
                   give_up: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold the version's lock file (flock: released by the kernel if the holder dies).
        A lock that cannot be had, or not within wait_seconds, costs time, never the version:
        compile without it."""
        fd = None
        if self.key() is not None:
            path = self.path_of(manifest).with_suffix(".lock")
            try:
                fd = lock_file(path, 0o600)
            except OSError as exc:
                log.warning("compiling %s without the cache's lock: %s", _named(manifest), exc)
        try:
            if fd is not None and not lock_within(fd, wait_seconds, give_up, poll=0.1):
                if give_up():
                    raise LoadError(f"gave up waiting for {_named(manifest)} to be compiled "
                                    "elsewhere: the server is stopping")
                log.warning("%s is still being compiled elsewhere after %.0f s; compiling "
                            "it here too", _named(manifest), wait_seconds)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def put(self, manifest: Manifest, compiled: CompiledVersion) -> None:
        key = self.key()
        if key is None:
            return
        path = self.path_of(manifest)
        data = compiled.to_bytes()
        try:
            write_atomically(path, self._mac(key, manifest, data) + data)
        except OSError as exc:  # a cache that cannot be written costs time, not service
            log.warning("compiled graph not cached in %s: %s", self.folder, exc)
            return
        self._evict()

    def _evict(self) -> None:
        """Keep the newest `keep` entries; entries another worker evicts meanwhile are skipped."""
        aged = []
        for entry in self.folder.glob("*.graph"):
            try:
                aged.append((entry.stat().st_mtime, entry))
            except FileNotFoundError:
                continue
        for _, old in sorted(aged, reverse=True)[self.keep:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".lock").unlink(missing_ok=True)


def _named(manifest: Manifest) -> str:
    return f"{manifest.name} version {manifest.version}"
