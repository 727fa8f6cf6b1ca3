"""A version compiled into one frozen graph: what the server actually runs.

Restoring five SavedModels and assembling them with Keras is ~1 s of Python and GIL-holding C++
per version, and leaves tens of thousands of Python objects (graphs of every restored function)
for the garbage collector to walk for as long as the version is loaded. Freezing the assembled
ensemble's function (variables folded into constants, member calls inlined) leaves one GraphDef
of a few hundred nodes: importing it takes ~0.1 s, and it computes the same numbers faster (no
variable reads, no nested function calls: ~0.6 against ~0.9 ms for one row, default ensemble).

`compile_version` does the heavy part (load, check, freeze) and is what runs in the child
process of `service.compiler`; `import_frozen` is the light part the server does itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from service.ensemble import (
    Ensemble,
    LoadError,
    _no_pause,
    input_signature,
    load_ensemble,
    warm_up,
    warmup_batch,
)
from service.lite import LiteRunner, to_lite
from service.repository import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)

# Frozen and original outputs must agree to this (float32 probabilities; constant folding may
# reorder a sum).
FAITHFUL_ATOL = 1e-5
FAITHFUL_ROWS = 32
_MAGIC = b"ensemble-frozen-graph/2\n"  # 2: graph size in the header, then the TensorFlow Lite model


@dataclass(frozen=True)
class FrozenGraph:
    """A serialized GraphDef and the names of its input and its two outputs (average, members);
    with the same ensemble as a TensorFlow Lite model when it converted and agreed (`lite`)."""

    graph_def: bytes
    input: str
    outputs: tuple[str, str]
    lite: bytes | None = None

    def write(self, path: Path) -> None:
        header = json.dumps({"input": self.input, "outputs": list(self.outputs),
                             "graph_bytes": len(self.graph_def)}).encode()
        Path(path).write_bytes(_MAGIC + header + b"\n" + self.graph_def + (self.lite or b""))

    @classmethod
    def read(cls, path: Path) -> "FrozenGraph":
        data = Path(path).read_bytes()
        if not data.startswith(_MAGIC):
            raise LoadError(f"{path} is not a frozen ensemble graph")
        header, _, rest = data[len(_MAGIC):].partition(b"\n")
        meta = json.loads(header)
        size = meta["graph_bytes"]
        if len(rest) < size:
            raise LoadError(f"{path} is truncated: {len(rest)} bytes where the graph alone has {size}")
        return cls(rest[:size], meta["input"], tuple(meta["outputs"]), rest[size:] or None)


class GraphCache:
    """Compiled versions kept in a folder, so a restarted server (or another worker) imports a
    version instead of compiling it again (~10 s in a child process).

    The key is the hash of the version's manifest.json, which holds every member file's
    sha256, plus the TensorFlow version. Only use it after the files were verified against the
    manifest (the manager does, before loading). Entries are written atomically; the newest
    `keep` are kept."""

    def __init__(self, folder: Path, keep: int = 16):
        self.folder, self.keep = Path(folder), keep

    def path_of(self, version_dir: Path) -> Path:
        digest = hashlib.sha256((Path(version_dir) / MANIFEST_FILE).read_bytes())
        digest.update(tf.__version__.encode())
        return self.folder / f"{digest.hexdigest()[:32]}.graph"

    def get(self, version_dir: Path) -> FrozenGraph | None:
        path = self.path_of(version_dir)
        try:
            return FrozenGraph.read(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, LoadError) as exc:  # damaged: compile again
            log.warning("ignoring unreadable compiled graph %s: %s", path, exc)
            return None

    def put(self, version_dir: Path, graph: FrozenGraph) -> None:
        path = self.path_of(version_dir)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            graph.write(tmp)
            os.replace(tmp, path)
        except OSError as exc:  # a cache that cannot be written costs time, not service
            log.warning("compiled graph not cached in %s: %s", self.folder, exc)
            return
        entries = sorted(self.folder.glob("*.graph"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[self.keep:]:
            old.unlink(missing_ok=True)


def freeze(ensemble: Ensemble) -> FrozenGraph:
    """Fold the ensemble function's variables into constants; raises LoadError if it cannot be."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        frozen = convert_variables_to_constants_v2(ensemble.fn)
    except Exception as exc:  # TensorFlow raises many types for graphs it cannot fold
        raise LoadError(f"cannot freeze the ensemble into one graph: {type(exc).__name__}: {exc}") from None
    if len(frozen.inputs) != 1 or len(frozen.outputs) != 2:
        raise LoadError(f"the frozen ensemble has {len(frozen.inputs)} inputs and {len(frozen.outputs)} "
                        "outputs, expected 1 and 2")
    return FrozenGraph(frozen.graph.as_graph_def().SerializeToString(), frozen.inputs[0].name,
                       (frozen.outputs[0].name, frozen.outputs[1].name))


def import_frozen(manifest: Manifest, version_dir: Path, graph: FrozenGraph, warmup_sizes: Sequence[int],
                  pace: Callable[[], None] = _no_pause, engine: str = "tflite", threads: int = 1,
                  pool: int = 1) -> Ensemble:
    """The servable ensemble of a frozen graph, warmed on `warmup_sizes` (outputs checked).

    With engine "tflite" and a TensorFlow Lite model in `graph`, that model computes (on `pool`
    interpreters of `threads` threads each, the inference threads' plan); should it fail to load
    or warm up here, the version runs on TensorFlow instead (logged). Engine "tensorflow": always
    TensorFlow."""
    graph_def = tf.compat.v1.GraphDef.FromString(graph.graph_def)

    def run(x):
        average, members = tf.graph_util.import_graph_def(
            graph_def, input_map={graph.input: x}, return_elements=list(graph.outputs), name="frozen")
        return average, members

    try:
        fn = tf.function(run, input_signature=input_signature(manifest.input)).get_concrete_function()
    except Exception as exc:  # a graph that does not import is a broken compilation, not a crash
        raise LoadError(f"cannot import the frozen ensemble graph: {type(exc).__name__}: {exc}") from None
    pace()
    if engine == "tflite" and graph.lite is not None:
        try:
            lite = LiteRunner(graph.lite, threads, pool)
            return warm_up(Ensemble(manifest, version_dir, fn, lite=lite), warmup_sizes, pace)
        except LoadError as exc:
            log.warning("%s version %d runs on TensorFlow: its TensorFlow Lite model failed: %s",
                        manifest.name, manifest.version, exc)
    return warm_up(Ensemble(manifest, version_dir, fn), warmup_sizes, pace)


def check_faithful(original: Ensemble, frozen: Ensemble) -> None:
    """The frozen graph must answer what the assembled members answer; LoadError otherwise."""
    x = warmup_batch(original.manifest.input, FAITHFUL_ROWS)
    for what, a, b in zip(("average", "member"), original.predict(x), frozen.predict(x)):
        worst = float(np.max(np.abs(a - b)))
        if not worst <= FAITHFUL_ATOL:
            raise LoadError(f"the frozen ensemble's {what} probabilities differ from the members' by {worst:.2g}")


def compile_version(manifest: Manifest, version_dir: Path, pace: Callable[[], None] = _no_pause) -> FrozenGraph:
    """Load every member (signature and warm-up checks included), freeze, and check the frozen
    graph against the members; then convert it to TensorFlow Lite, kept if it answers the same
    too. Raises a LoadError (with its category) on any problem with the frozen graph; a model
    that does not convert only runs on TensorFlow."""
    original = load_ensemble(manifest, version_dir, (1, FAITHFUL_ROWS), pace)
    graph = freeze(original)
    pace()
    frozen = import_frozen(manifest, version_dir, graph, (), engine="tensorflow")
    check_faithful(original, frozen)
    pace()
    return replace(graph, lite=convert_checked(original, frozen))


def convert_checked(original: Ensemble, frozen: Ensemble) -> bytes | None:
    """The TensorFlow Lite model of the frozen ensemble if it converts and answers what the
    members answer; None (logged) otherwise."""
    try:
        lite = to_lite(frozen.fn)
        check_faithful(original, warm_up(replace(frozen, lite=LiteRunner(lite)), (1, FAITHFUL_ROWS)))
        return lite
    except LoadError as exc:  # WarmupError included
        log.warning("%s version %d will run on TensorFlow: %s", original.name, original.version, exc)
        return None


def load_frozen(manifest: Manifest, version_dir: Path, warmup_sizes: Sequence[int]) -> Ensemble:
    """Compile and import in this process: the ensemble exactly as the server runs it (for the
    benchmarks, and whoever wants the served function without a server)."""
    return import_frozen(manifest, version_dir, compile_version(manifest, version_dir), warmup_sizes)
