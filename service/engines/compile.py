"""Compiling a version: its members assembled, frozen into one graph, converted to TensorFlow
Lite, and each result checked against the members.

Restoring the members' SavedModels and assembling them with Keras is Python and GIL-holding
C++, and leaves tens of thousands of Python objects (the graphs of every restored function)
for the garbage collector to walk for as long as the version is loaded. Freezing the assembled
ensemble's function (variables folded into constants, member calls inlined) leaves one GraphDef
of a few hundred nodes that imports quickly and computes the same numbers with fewer steps;
converting that graph to TensorFlow Lite lets XNNPACK's kernels run it.

`compile_version` does all of it, usually in the child process of `child`; a server then only
reads the result (`compiled`) and runs one engine of it (`loader`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from service.engines.base import Ensemble, LoadError, no_pause, warmup_batch
from service.engines.compiled import CompiledVersion
from service.engines.keras_members import load_members
from service.engines.lite import load_lite
from service.engines.tensorflow import freeze, import_frozen
from contract.manifest import Manifest
from contract.scores import SCORES

log = logging.getLogger(__name__)

# Compiled and original outputs must agree to this (float32 probabilities; constant folding may
# reorder a sum).
FAITHFUL_ATOL = 1e-5
FAITHFUL_ROWS = 32


def check_faithful(original: Ensemble, compiled: Ensemble) -> None:
    """The compiled ensemble must answer what the assembled members answer; LoadError otherwise."""
    x = warmup_batch(original.manifest.input, FAITHFUL_ROWS)
    for what, a, b in zip(("average", "member", "uncertainty"), original.predict(x), compiled.predict(x)):
        if what == "uncertainty":  # the scores; the abstain flag (a comparison of one) may flip at its threshold
            a, b = a[:, :len(SCORES)], b[:, :len(SCORES)]
        worst = float(np.max(np.abs(a - b)))
        if not worst <= FAITHFUL_ATOL:
            raise LoadError(f"the {compiled.engine.kind} ensemble's {what} outputs differ from the "
                            f"members' by {worst:.2g}")


def compile_version(manifest: Manifest, version_dir: Path, pace: Callable[[], None] = no_pause) -> CompiledVersion:
    """Load every member (signature and warm-up checks included), freeze, and check the frozen
    graph against the members; then convert it to TensorFlow Lite, kept if it answers the same
    too. Raises a LoadError (with its category) on any problem with the frozen graph; a model
    that does not convert only runs on TensorFlow."""
    original = load_members(manifest, version_dir, (1, FAITHFUL_ROWS), pace)
    graph = freeze(original.engine.fn)
    pace()
    frozen = import_frozen(manifest, version_dir, graph, ())
    check_faithful(original, frozen)
    pace()
    return CompiledVersion(graph, convert_checked(original, frozen))


def to_lite(fn, owner: object = None) -> bytes:
    """The TensorFlow Lite flatbuffer of a concrete function (a frozen one, or one whose
    variables `owner` tracks), with TensorFlow Lite's own ops only; LoadError saying why if it
    does not convert (the TensorFlow ops it lacks, when that is the reason)."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], owner)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecated conversion path of bare concrete functions
            return converter.convert()
    except Exception as exc:  # the converter raises many types (ConverterError, ValueError, ...)
        raise LoadError(f"cannot convert the ensemble to TensorFlow Lite: {conversion_failure(exc)}") from None


def conversion_failure(exc: Exception) -> str:
    """The reason in a converter's error: the TensorFlow ops TensorFlow Lite lacks (string ops,
    lookup tables), else its first line."""
    text = str(exc).strip()
    for line in text.splitlines():
        if line.startswith("TF Select ops:"):
            return f"TensorFlow Lite has no kernels for {line.partition(':')[2].strip()[:300]}"
    return text.splitlines()[0][:300] if text else type(exc).__name__


def convert_checked(original: Ensemble, frozen: Ensemble) -> bytes | None:
    """The TensorFlow Lite model of the frozen ensemble if it converts and answers what the
    members answer; None (logged) otherwise."""
    try:
        lite = to_lite(frozen.engine.fn)
        check_faithful(original, load_lite(original.manifest, original.path, lite, (1, FAITHFUL_ROWS)))
        return lite
    except LoadError as exc:  # WarmupError included
        log.warning("%s version %d will run on TensorFlow: %s", original.name, original.version, exc)
        return None
