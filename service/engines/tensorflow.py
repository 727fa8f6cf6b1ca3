"""The TensorFlow engine: a version's frozen graph (or its assembled members) run by TensorFlow.

A server imports this module only for a version that runs on TensorFlow: one whose graph does
not convert to TensorFlow Lite, or every version with `engine = "tensorflow"`. The compile step
(`compile`) uses it too, to freeze the assembled members and to check the frozen graph.

This is the one module that uses TensorFlow's internals, and only two of them, each checked
once (tensorflow-cpu is pinned to the release line they were checked on, in pyproject.toml):
- a concrete function's flat entry point, `_call_flat(args, captured_inputs)`: it skips the
  structured-signature checks of a public call, which have nothing to find when the input
  signature is fixed at load. Checked on the first function wrapped; without it, the public
  call serves, after one warning.
- `convert_variables_to_constants_v2`, which folds a function's variables into constants (the
  frozen graph). Checked at import. TensorFlow 2 has no public equivalent: without it no
  version can be frozen, and compiling one fails with that reason (after one warning).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from service.engines.base import Ensemble, LoadError, no_pause, warm_up
from service.engines.compiled import FrozenGraph
from contract.manifest import InputSpec, Manifest

log = logging.getLogger(__name__)

try:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
except ImportError:  # pragma: no cover - depends on the installed TensorFlow
    convert_variables_to_constants_v2 = None
    log.warning("this TensorFlow has no convert_variables_to_constants_v2: versions cannot be "
                "frozen, so none can be compiled (install the tensorflow-cpu release pyproject.toml names)")


@functools.lru_cache(maxsize=None)
def _flat_call_names(cls: type) -> bool:
    """Whether concrete functions of this class have the flat entry point; warns once if not."""
    found = hasattr(cls, "_call_flat") and hasattr(cls, "captured_inputs")
    if not found:  # pragma: no cover - depends on the installed TensorFlow
        log.warning("this TensorFlow's concrete functions have no _call_flat: the TensorFlow engine "
                    "calls them through the public API (slower per call)")
    return found


class TensorFlowEngine:
    """x -> (average, members, scores) by one concrete TensorFlow function with a fixed input signature.

    `owner` keeps alive what the function reads, if anything (the Keras model whose variables
    the assembled members' function uses); a frozen graph reads nothing else."""

    kind = "tensorflow"

    def __init__(self, fn, owner: object = None):
        self.fn, self.owner = fn, owner
        if _flat_call_names(type(fn)):
            call_flat, captured = fn._call_flat, fn.captured_inputs
            self._call = lambda x: call_flat([x], captured)
        else:
            self._call = fn

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        average, members, scores = self._call(tf.constant(x))
        return average.numpy(), members.numpy(), scores.numpy()


def input_signature(spec: InputSpec) -> list[tf.TensorSpec]:
    """The one input of the ensemble's function: a batch of rows of the manifest's input spec."""
    return [tf.TensorSpec([None, *spec.shape], tf.as_dtype(spec.dtype), name="instances")]


def freeze(fn) -> FrozenGraph:
    """Fold a concrete function's variables into constants; LoadError if it cannot be."""
    if convert_variables_to_constants_v2 is None:
        raise LoadError("this TensorFlow cannot freeze a graph (no convert_variables_to_constants_v2)")
    try:
        frozen = convert_variables_to_constants_v2(fn)
    except Exception as exc:  # TensorFlow raises many types for graphs it cannot fold
        raise LoadError(f"cannot freeze the ensemble into one graph: {type(exc).__name__}: {exc}") from None
    if len(frozen.inputs) != 1 or len(frozen.outputs) != 3:
        raise LoadError(f"the frozen ensemble has {len(frozen.inputs)} inputs and {len(frozen.outputs)} "
                        "outputs, expected 1 and 3")
    return FrozenGraph(frozen.graph.as_graph_def().SerializeToString(), frozen.inputs[0].name,
                       tuple(t.name for t in frozen.outputs))


def import_frozen(manifest: Manifest, version_dir: Path, graph: FrozenGraph, warmup_sizes: Sequence[int],
                  pace: Callable[[], None] = no_pause) -> Ensemble:
    """The frozen graph as a servable ensemble on TensorFlow, warmed on `warmup_sizes` (outputs
    checked)."""
    graph_def = tf.compat.v1.GraphDef.FromString(graph.graph_def)

    def run(x):
        average, members, scores = tf.graph_util.import_graph_def(
            graph_def, input_map={graph.input: x}, return_elements=list(graph.outputs), name="frozen")
        return average, members, scores

    try:
        fn = tf.function(run, input_signature=input_signature(manifest.input)).get_concrete_function()
    except Exception as exc:  # a graph that does not import is a broken compilation, not a crash
        raise LoadError(f"cannot import the frozen ensemble graph: {type(exc).__name__}: {exc}") from None
    pace()
    return warm_up(Ensemble(manifest, version_dir, TensorFlowEngine(fn)), warmup_sizes, pace)


@functools.lru_cache(maxsize=None)
def configure_threads(intra: int, inter: int) -> None:
    """Size TensorFlow's thread pools, once, before it runs its first op."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as exc:  # already initialised (e.g. several apps in one test process)
        log.warning("TensorFlow threads not changed: %s", exc)
