"""A compiled version as bytes: its frozen TensorFlow graph and, when it converted, its
TensorFlow Lite model; the file they are kept in, and the cache of those files. No TensorFlow
here: a server whose versions run on TensorFlow Lite reads these without importing it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from service.engines.base import LoadError
from service.repository import MANIFEST_FILE

log = logging.getLogger(__name__)

_MAGIC = b"ensemble-frozen-graph/2\n"  # 2: graph size in the header, then the TensorFlow Lite model


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
    """A serialized GraphDef and the names of its input and its two outputs (average, members)."""

    graph_def: bytes
    input: str
    outputs: tuple[str, str]


@dataclass(frozen=True)
class CompiledVersion:
    """What compiling a version yields: its frozen graph, and the same ensemble as a TensorFlow
    Lite model when it converted and agreed with the members (`lite`; else None)."""

    frozen: FrozenGraph
    lite: bytes | None = None

    def write(self, path: Path) -> None:
        graph = self.frozen
        header = json.dumps({"input": graph.input, "outputs": list(graph.outputs),
                             "graph_bytes": len(graph.graph_def)}).encode()
        Path(path).write_bytes(_MAGIC + header + b"\n" + graph.graph_def + (self.lite or b""))

    @classmethod
    def read(cls, path: Path) -> "CompiledVersion":
        data = Path(path).read_bytes()
        if not data.startswith(_MAGIC):
            raise LoadError(f"{path} is not a frozen ensemble graph")
        header, _, rest = data[len(_MAGIC):].partition(b"\n")
        meta = json.loads(header)
        size = meta["graph_bytes"]
        if len(rest) < size:
            raise LoadError(f"{path} is truncated: {len(rest)} bytes where the graph alone has {size}")
        return cls(FrozenGraph(rest[:size], meta["input"], tuple(meta["outputs"])), rest[size:] or None)


class CompileCache:
    """Compiled versions kept in a folder, so a restarted server (or another worker) reads a
    version's compilation instead of compiling it again in a child process.

    The key is the hash of the version's manifest.json, which holds every member file's
    sha256, plus the TensorFlow version. Only use it after the files were verified against the
    manifest (the manager does, before loading). Entries are written atomically; the newest
    `keep` are kept. Processes sharing the folder (`--workers N`) compile a version one at a
    time (`get_or_compile`): the others wait for the first and read its entry."""

    def __init__(self, folder: Path, keep: int = 16):
        self.folder, self.keep = Path(folder), keep

    def path_of(self, version_dir: Path) -> Path:
        digest = hashlib.sha256((Path(version_dir) / MANIFEST_FILE).read_bytes())
        digest.update(tensorflow_version().encode())
        return self.folder / f"{digest.hexdigest()[:32]}.graph"

    def get(self, version_dir: Path) -> CompiledVersion | None:
        path = self.path_of(version_dir)
        try:
            return CompiledVersion.read(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, LoadError) as exc:  # damaged: compile again
            log.warning("ignoring unreadable compiled graph %s: %s", path, exc)
            return None

    def get_or_compile(self, version_dir: Path, compile: Callable[[], CompiledVersion],
                       wait_seconds: float, give_up: Callable[[], bool] = lambda: False) -> CompiledVersion:
        """The cached compilation of the version, or compile()'s, cached. While another process (or
        thread) compiles the same version, wait for it, up to wait_seconds, and take its entry:
        N workers that see a new version at once compile it once, not N times side by side.
        While waiting, raise LoadError as soon as give_up() (the server is stopping)."""
        compiled = self.get(version_dir)
        if compiled is not None:
            return compiled
        with self._compiling(version_dir, wait_seconds, give_up):
            compiled = self.get(version_dir)  # compiled by whoever held the lock before us
            if compiled is None:
                compiled = compile()
                self.put(version_dir, compiled)
        return compiled

    @contextmanager
    def _compiling(self, version_dir: Path, wait_seconds: float,
                   give_up: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold the version's lock file (flock: released by the kernel if the holder dies).
        A lock that cannot be had, or not within wait_seconds, costs time, never the version:
        compile without it."""
        path = self.path_of(version_dir).with_suffix(".lock")
        fd = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("compiling %s without the cache's lock: %s", version_dir, exc)
        try:
            if fd is not None:
                deadline = time.monotonic() + wait_seconds
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if give_up():
                            raise LoadError(f"gave up waiting for {version_dir} to be compiled "
                                            "elsewhere: the server is stopping") from None
                        if time.monotonic() >= deadline:
                            log.warning("%s is still being compiled elsewhere after %.0f s; compiling "
                                        "it here too", version_dir, wait_seconds)
                            break
                        time.sleep(0.1)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def put(self, version_dir: Path, compiled: CompiledVersion) -> None:
        path = self.path_of(version_dir)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            compiled.write(tmp)
            os.replace(tmp, path)
        except OSError as exc:  # a cache that cannot be written costs time, not service
            log.warning("compiled graph not cached in %s: %s", self.folder, exc)
            return
        entries = sorted(self.folder.glob("*.graph"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[self.keep:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".lock").unlink(missing_ok=True)
