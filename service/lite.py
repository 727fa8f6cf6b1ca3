"""The ensemble as a TensorFlow Lite model: what the server runs when a version converts.

The frozen graph (service.frozen) still runs every small op through TensorFlow's executor; on
the default ensemble that is 0.70 ms for one row and 4.9 ms for 32 on one thread. The same graph
converted to TensorFlow Lite and run by its XNNPACK CPU kernels: 0.11 ms and 2.4 ms, answering
the same probabilities to within 1e-6. So `compile_version` converts the frozen ensemble too,
and the server runs the converted model when it agrees with the members (the `engine` setting);
a version whose graph does not convert (an op TensorFlow Lite lacks) runs on TensorFlow as before.

An interpreter is not thread-safe, so `LiteRunner` keeps a pool: each call borrows one, and
the pool holds as many as calls have ever run at once (the inference threads). A batch of a new
size resizes the borrowed interpreter's input (~25 us). The interpreter releases the GIL while
it computes.

`tf.lite.Interpreter` is deprecated in favour of the separate `ai_edge_litert` package, but
present in the pinned TensorFlow (2.21); moving to LiteRT would let the server run without
importing TensorFlow at all.
"""

from __future__ import annotations

import queue
import warnings

import numpy as np
import tensorflow as tf

from service.ensemble import LoadError


def to_lite(fn) -> bytes:
    """The TensorFlow Lite flatbuffer of a concrete function x -> (average, members), with
    TensorFlow Lite's own ops only; LoadError if it does not convert."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return converter.convert()
    except Exception as exc:  # the converter raises many types (ConverterError, ValueError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"cannot convert the ensemble to TensorFlow Lite: {first}") from None


class LiteRunner:
    """x -> (average (rows, classes), members (rows, members, classes)) on a pool of
    TensorFlow Lite interpreters of one model; callable from any number of threads."""

    def __init__(self, model: bytes, threads: int = 1, pool: int = 1):
        self.model, self.threads = model, threads
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        first = self._new()  # fails here, at load, if the model is unusable
        self.input_dtype = first.interpreter.get_input_details()[0]["dtype"]
        self._idle.put(first)
        for _ in range(pool - 1):
            self._idle.put(self._new())

    def _new(self) -> "_Slot":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice, once per interpreter
            try:
                interpreter = tf.lite.Interpreter(model_content=self.model, num_threads=self.threads)
            except (ValueError, RuntimeError) as exc:
                raise LoadError(f"TensorFlow Lite cannot load the converted ensemble: {exc}") from None
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        ranks = sorted((len(o["shape"]), o["index"]) for o in outputs)
        if len(inputs) != 1 or [rank for rank, _ in ranks] != [2, 3]:
            raise LoadError(f"the converted ensemble has {len(inputs)} inputs and outputs of ranks "
                            f"{[rank for rank, _ in ranks]}; expected one input, outputs of ranks 2 and 3")
        interpreter.allocate_tensors()
        return _Slot(interpreter, inputs[0]["index"], ranks[0][1], ranks[1][1], tuple(inputs[0]["shape"]))

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
            return interpreter.get_tensor(slot.average), interpreter.get_tensor(slot.members)
        finally:
            self._idle.put(slot)


class _Slot:
    """One interpreter of the pool, the indices of its tensors, and its current input shape."""

    __slots__ = ("interpreter", "source", "average", "members", "shape")

    def __init__(self, interpreter, source: int, average: int, members: int, shape: tuple[int, ...]):
        self.interpreter, self.source, self.average, self.members = interpreter, source, average, members
        self.shape = shape
