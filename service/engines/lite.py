"""The TensorFlow Lite engine: what the server runs when a version converts (the default).

The frozen graph (`tensorflow`) runs every small op through TensorFlow's executor; the same
graph converted to TensorFlow Lite and run by its XNNPACK CPU kernels needs several times less
CPU per row on small models, answering the same probabilities (docs/performance.md has the
figures). So `compile.compile_version` converts the frozen ensemble too, and the server runs
the converted model when it agrees with the members (the `engine` setting); a version whose
graph does not convert (an op TensorFlow Lite lacks) runs on TensorFlow.

The interpreter is LiteRT's (`ai_edge_litert`, TensorFlow Lite's runtime packaged on its own):
this module does not import TensorFlow, so neither does a server whose versions all run here.

A format-2 version (named inputs, heads) whose members convert runs here too, on
`NamedLiteEngine`: its members' outputs stacked per head, as service.engines.named's function
returns them.

An interpreter is not thread-safe, so each engine keeps a pool: each call borrows one, and
the pool holds as many as calls have ever run at once (the inference threads). A batch of a new
size resizes the borrowed interpreter's input. The interpreter releases the GIL while it
computes.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from service.answer import SCORE_COLUMNS
from service.engines.base import Ensemble, LoadError, no_pause, warm_up, warm_up_named
from contract.manifest import Manifest


def load_lite(manifest: Manifest, version_dir: Path, model: bytes, warmup_sizes: Sequence[int],
              pace: Callable[[], None] = no_pause, threads: int = 1, pool: int = 1) -> Ensemble:
    """A version's TensorFlow Lite model as a servable ensemble, on `pool` interpreters of
    `threads` threads each (the inference threads' plan), warmed on `warmup_sizes` (outputs
    checked); LoadError (or WarmupError) if it is not usable."""
    engine = LiteEngine(model, threads, pool)
    pace()
    return warm_up(Ensemble(manifest, version_dir, engine), warmup_sizes, pace)


class LiteEngine:
    """x -> (average (rows, classes), members (rows, members, classes), scores (rows, 4)) on a pool of
    TensorFlow Lite interpreters of one model; `run` from any number of threads."""

    kind = "tflite"

    def __init__(self, model: bytes, threads: int = 1, pool: int = 1):
        self.model, self.threads = model, threads
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        first = self._new()  # fails here, at load, if the model is unusable
        self.input_dtype = first.interpreter.get_input_details()[0]["dtype"]
        self._idle.put(first)
        for _ in range(pool - 1):
            self._idle.put(self._new())

    def _new(self) -> "_Slot":
        interpreter = interpreter_of(self.model, self.threads)
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        ordered = order_outputs(outputs)
        if len(inputs) != 1 or ordered is None:
            raise LoadError(f"the converted ensemble has {len(inputs)} inputs and outputs of shapes "
                            f"{[[int(d) for d in o['shape_signature']] for o in outputs]}; expected one input, and "
                            f"outputs (rows, classes), (rows, members, classes) and (rows, {SCORE_WIDTH})")
        interpreter.allocate_tensors()
        return _Slot(interpreter, inputs[0]["index"], *(o["index"] for o in ordered), tuple(inputs[0]["shape"]))

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            slot = self._idle.get_nowait()
        except queue.Empty:  # more calls at once than ever before
            slot = self._new()
        try:
            interpreter = slot.interpreter
            if slot.shape != x.shape:
                interpreter.resize_tensor_input(slot.source, x.shape, strict=False)
                interpreter.allocate_tensors()
                slot.shape = x.shape
            interpreter.set_tensor(slot.source, np.ascontiguousarray(x, dtype=self.input_dtype))
            interpreter.invoke()
            return (interpreter.get_tensor(slot.average), interpreter.get_tensor(slot.members),
                    interpreter.get_tensor(slot.scores))
        finally:
            self._idle.put(slot)


def interpreter_of(model: bytes, threads: int) -> Interpreter:
    """A new interpreter of the model; LoadError if TensorFlow Lite cannot load it."""
    try:
        return Interpreter(model_content=model, num_threads=threads)
    except (ValueError, RuntimeError) as exc:
        raise LoadError(f"TensorFlow Lite cannot load the converted ensemble: {exc}") from None


def output_number(name: str) -> int:
    """0 for "Identity", k for "Identity_k" (any other name sorts last): the converter names a
    function's outputs in their order."""
    head, _, number = name.rpartition("_")
    if name == "Identity":
        return 0
    return int(number) if head == "Identity" and number.isdigit() else 1 << 30


def order_outputs(outputs: list[dict]) -> list[dict] | None:
    """The interpreter's output details as (average, members, scores), told apart by shape: the
    members are the rank-3 output (rows, members, classes), the average (rows, classes), the
    scores (rows, SCORE_WIDTH); with as many classes as SCORE_WIDTH the two rank-2 outputs are
    told apart by their names' order (the function returns the average first). None if the
    shapes are not these."""
    if len(outputs) != 3:
        return None
    members = [o for o in outputs if len(o["shape"]) == 3]
    pair = sorted((o for o in outputs if len(o["shape"]) == 2), key=lambda o: output_number(o["name"]))
    if len(members) != 1 or len(pair) != 2:
        return None
    classes = int(members[0]["shape"][-1])
    widths = [int(o["shape"][-1]) for o in pair]
    if widths == [classes, SCORE_WIDTH]:
        return [pair[0], members[0], pair[1]]
    if widths == [SCORE_WIDTH, classes]:
        return [pair[1], members[0], pair[0]]
    return None


SCORE_WIDTH = len(SCORE_COLUMNS)


class _Slot:
    """One interpreter of the pool, the indices of its tensors, and its current input shape."""

    __slots__ = ("interpreter", "source", "average", "members", "scores", "shape")

    def __init__(self, interpreter, source: int, average: int, members: int, scores: int,
                 shape: tuple[int, ...]):
        self.interpreter, self.source = interpreter, source
        self.average, self.members, self.scores = average, members, scores
        self.shape = shape


def load_named_lite(manifest: Manifest, version_dir: Path, model: bytes, warmup_sizes: Sequence[int],
                    pace: Callable[[], None] = no_pause, threads: int = 1, pool: int = 1) -> Ensemble:
    """A format-2 version's TensorFlow Lite model (service.engines.named.compile_named) as a
    servable ensemble, warmed and checked per head; LoadError (or WarmupError) if it is not usable."""
    names = tuple(spec.name for spec in manifest.inputs)
    outputs = sum(2 if head.variance else 1 for head in manifest.heads)
    engine = NamedLiteEngine(model, names, outputs, threads, pool)
    pace()
    return warm_up_named(Ensemble(manifest, version_dir, engine), warmup_sizes, pace)


class NamedLiteEngine:
    """A format-2 version's converted members: named inputs (a dict of arrays) -> per head the
    members' stacked outputs, in the order of service.engines.named's function (the
    converter names them Identity, Identity_1, ...); a pool of interpreters as `LiteEngine`.
    A variable dimension's length may change from call to call: the borrowed interpreter is
    resized to each call's shapes."""

    kind = "tflite"

    def __init__(self, model: bytes, names: Sequence[str], outputs: int, threads: int = 1, pool: int = 1):
        self.model, self.names, self.outputs, self.threads = model, tuple(names), outputs, threads
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, pool)):  # the first fails here, at load, if the model is unusable
            self._idle.put(self._new())

    def _new(self) -> "_NamedSlot":
        interpreter = interpreter_of(self.model, self.threads)
        inputs = {d["name"]: d for d in interpreter.get_input_details()}
        outputs = sorted(interpreter.get_output_details(), key=lambda o: output_number(o["name"]))
        if set(inputs) != set(self.names) or len(outputs) != self.outputs:
            raise LoadError(f"the converted ensemble takes {sorted(inputs)} and gives {len(outputs)} outputs; "
                            f"expected {sorted(self.names)} and {self.outputs}")
        interpreter.allocate_tensors()
        return _NamedSlot(interpreter, [(name, inputs[name]["index"], inputs[name]["dtype"]) for name in self.names],
                          [o["index"] for o in outputs])

    def run(self, x: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        try:
            slot = self._idle.get_nowait()
        except queue.Empty:  # more calls at once than ever before
            slot = self._new()
        try:
            interpreter = slot.interpreter
            shapes = tuple(x[name].shape for name in self.names)
            if shapes != slot.shapes:
                for (_, index, _), shape in zip(slot.inputs, shapes):
                    interpreter.resize_tensor_input(index, shape, strict=False)
                interpreter.allocate_tensors()
                slot.shapes = shapes
            for name, index, dtype in slot.inputs:
                interpreter.set_tensor(index, np.ascontiguousarray(x[name], dtype=dtype))
            interpreter.invoke()
            return tuple(interpreter.get_tensor(index) for index in slot.outputs)
        finally:
            self._idle.put(slot)


class _NamedSlot:
    """One interpreter of a NamedLiteEngine's pool: its inputs (name, index, dtype), its output
    indices in order, and the input shapes it is allocated for."""

    __slots__ = ("interpreter", "inputs", "outputs", "shapes")

    def __init__(self, interpreter, inputs: list[tuple[str, int, np.dtype]], outputs: list[int]):
        self.interpreter, self.inputs, self.outputs = interpreter, inputs, outputs
        self.shapes: tuple = ()
