"""A version compiled into one frozen graph: what the server actually runs.

Restoring five SavedModels and assembling them with Keras is ~1 s of Python and GIL-holding C++
per version, and leaves tens of thousands of Python objects (graphs of every restored function)
for the garbage collector to walk for as long as the version is loaded. Freezing the assembled
ensemble's function (variables folded into constants, member calls inlined) leaves one GraphDef
of a few hundred nodes: importing it takes ~0.1 s, and it computes the same numbers faster (no
variable reads, no nested function calls: ~0.6 against ~0.9 ms for one row, default ensemble).

`compile_version` does the heavy part (load, check, freeze, convert to TensorFlow Lite) and is
what runs in the child process of `service.compiler`; `import_frozen` is the light part, done
by a server only for a version that runs on TensorFlow (the others run on TensorFlow Lite,
`service.lite`, and the server never imports TensorFlow for them).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from service.compiled import FrozenGraph, GraphCache  # noqa: F401  (re-exported)
from service.ensemble import (
    Ensemble,
    LoadError,
    _no_pause,
    input_signature,
    load_ensemble,
    tensorflow_run,
    warm_up,
    warmup_batch,
)
from service.lite import load_lite
from service.repository import Manifest

log = logging.getLogger(__name__)

# Frozen and original outputs must agree to this (float32 probabilities; constant folding may
# reorder a sum).
FAITHFUL_ATOL = 1e-5
FAITHFUL_ROWS = 32


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
                  pace: Callable[[], None] = _no_pause) -> Ensemble:
    """The frozen graph as a servable ensemble on TensorFlow, warmed on `warmup_sizes` (outputs
    checked)."""
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
    return warm_up(Ensemble(manifest, version_dir, tensorflow_run(fn), "tensorflow", fn), warmup_sizes, pace)


def check_faithful(original: Ensemble, compiled: Ensemble) -> None:
    """The compiled ensemble must answer what the assembled members answer; LoadError otherwise."""
    x = warmup_batch(original.manifest.input, FAITHFUL_ROWS)
    for what, a, b in zip(("average", "member"), original.predict(x), compiled.predict(x)):
        worst = float(np.max(np.abs(a - b)))
        if not worst <= FAITHFUL_ATOL:
            raise LoadError(f"the {compiled.engine} ensemble's {what} probabilities differ from the "
                            f"members' by {worst:.2g}")


def compile_version(manifest: Manifest, version_dir: Path, pace: Callable[[], None] = _no_pause) -> FrozenGraph:
    """Load every member (signature and warm-up checks included), freeze, and check the frozen
    graph against the members; then convert it to TensorFlow Lite, kept if it answers the same
    too. Raises a LoadError (with its category) on any problem with the frozen graph; a model
    that does not convert only runs on TensorFlow."""
    original = load_ensemble(manifest, version_dir, (1, FAITHFUL_ROWS), pace)
    graph = freeze(original)
    pace()
    frozen = import_frozen(manifest, version_dir, graph, ())
    check_faithful(original, frozen)
    pace()
    return replace(graph, lite=convert_checked(original, frozen))


def to_lite(fn) -> bytes:
    """The TensorFlow Lite flatbuffer of a concrete function x -> (average, members), with
    TensorFlow Lite's own ops only; LoadError if it does not convert."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecated conversion path of bare concrete functions
            return converter.convert()
    except Exception as exc:  # the converter raises many types (ConverterError, ValueError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"cannot convert the ensemble to TensorFlow Lite: {first}") from None


def convert_checked(original: Ensemble, frozen: Ensemble) -> bytes | None:
    """The TensorFlow Lite model of the frozen ensemble if it converts and answers what the
    members answer; None (logged) otherwise."""
    try:
        lite = to_lite(frozen.fn)
        check_faithful(original, load_lite(original.manifest, original.path, lite, (1, FAITHFUL_ROWS)))
        return lite
    except LoadError as exc:  # WarmupError included
        log.warning("%s version %d will run on TensorFlow: %s", original.name, original.version, exc)
        return None


def load_frozen(manifest: Manifest, version_dir: Path, warmup_sizes: Sequence[int]) -> Ensemble:
    """Compile and import in this process: the ensemble as the server runs it, on TensorFlow
    Lite when it converted (for the benchmarks, and whoever wants it without a server). `fn` is
    the frozen graph's TensorFlow function either way."""
    graph = compile_version(manifest, version_dir)
    frozen = import_frozen(manifest, version_dir, graph, warmup_sizes)
    if graph.lite is None:
        return frozen
    return replace(load_lite(manifest, version_dir, graph.lite, warmup_sizes), fn=frozen.fn)
