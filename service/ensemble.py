"""Loading a version's members and assembling them into one averaging Keras model.

The members are SavedModels (`model.export`), reloaded as `keras.layers.TFSMLayer`s and joined
in a Functional-API model whose outputs are the (weighted) average and the stacked per-member
probabilities. One `tf.function` with a fixed input signature runs it: traced once, at load.
The service does not serve this function itself: `service.frozen` compiles it into one frozen
graph and converts that to TensorFlow Lite (`service.lite`), which the server runs when the
version converts. The servable `Ensemble` and its checks are TensorFlow-free, in
`service.servable`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from service.repository import InputSpec, Manifest
from service.servable import (  # noqa: F401  (re-exported: the TensorFlow side's callers use them)
    Ensemble,
    LoadError,
    WarmupError,
    _no_pause,
    check_probabilities,
    warm_up,
    warmup_batch,
)


class SignatureError(LoadError):
    """A member's serving signature does not match the manifest's input spec."""

    category = "signature"


def check_signature(member: str, signature: Sequence[tf.TensorSpec], spec: InputSpec) -> None:
    """The member's serving endpoint must take exactly one tensor compatible with the input spec."""
    if len(signature) != 1:
        raise SignatureError(f"member {member}: serving endpoint takes {len(signature)} inputs, expected 1")
    expected = tf.TensorSpec([None, *spec.shape], tf.as_dtype(spec.dtype))
    got = signature[0]
    if got.dtype != expected.dtype:
        raise SignatureError(f"member {member}: takes dtype {got.dtype.name}, manifest says {spec.dtype}")
    if not got.shape.is_compatible_with(expected.shape):
        raise SignatureError(
            f"member {member}: takes shape {got.shape.as_list()[1:]}, manifest says {list(spec.shape)}"
        )


def tensorflow_run(fn) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Rows -> (average, members) as numpy arrays, computed by a concrete function."""
    call = flat_call(fn)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        average, members = call(tf.constant(x))
        return average.numpy(), members.numpy()

    return run


def flat_call(fn) -> Callable:
    """`fn` without the Python around a call: the concrete function already skips the
    polymorphic dispatch (about 0.5 ms), and its flat entry point skips the structured-signature
    checks too (0.49 against 0.62 ms for one row of the default ensemble). The input signature
    is fixed at load, so those checks have nothing to find. Falls back to `fn` itself if this
    TensorFlow has no flat entry point; the warm-up runs whichever is chosen."""
    call_flat, captured = getattr(fn, "_call_flat", None), getattr(fn, "captured_inputs", None)
    if call_flat is None or captured is None:
        return fn
    return lambda x: call_flat([x], captured)


def _combine(outputs: list, weights: Sequence[float]):
    """Plain mean when the weights are equal (keras.layers.Average), weighted sum otherwise."""
    if len(outputs) == 1:
        return outputs[0]
    if np.allclose(weights, weights[0]):
        return keras.layers.Average(name="average")(outputs)
    scaled = [keras.layers.Rescaling(float(w), name=f"weight_{i}")(o) for i, (o, w) in enumerate(zip(outputs, weights))]
    return keras.layers.Add(name="weighted_average")(scaled)


def assemble(manifest: Manifest, version_dir: Path, pace: Callable[[], None] = _no_pause) -> keras.Model:
    """Reload every member and build the averaging Functional model; checks each signature.
    `pace` is called between steps (the manager's loader uses it to share the CPU)."""
    spec = manifest.input
    inputs = keras.Input(shape=spec.shape, dtype=spec.dtype, name="instances")
    outputs = []
    for member in manifest.members:
        try:
            layer = keras.layers.TFSMLayer(str(version_dir / member.path), call_endpoint="serve",
                                           name=f"member_{member.name}".replace("-", "_"))
        except Exception as exc:  # TF raises many types for unreadable SavedModels
            raise LoadError(f"member {member.name}: cannot load SavedModel: {exc}") from None
        check_signature(member.name, layer.call_endpoint_fn.input_signature, spec)
        outputs.append(layer(inputs))
        pace()
    average = _combine(outputs, manifest.weights)
    stacked = keras.layers.Concatenate(axis=1, name="members")(
        [keras.layers.Reshape((1, -1))(o) for o in outputs]
    )
    return keras.Model(inputs, [average, stacked], name=f"{manifest.name}_v{manifest.version}")


def input_signature(spec: InputSpec) -> list[tf.TensorSpec]:
    """The one input of the ensemble's function: a batch of rows of the manifest's input spec."""
    return [tf.TensorSpec([None, *spec.shape], tf.as_dtype(spec.dtype), name="instances")]


def load_ensemble(manifest: Manifest, version_dir: Path, warmup_sizes: Sequence[int],
                  pace: Callable[[], None] = _no_pause) -> Ensemble:
    """Assemble, trace and smoke-test a version. Raises LoadError with the reason on any problem."""
    model = assemble(manifest, version_dir, pace)
    fn = tf.function(lambda x: model(x, training=False), input_signature=input_signature(manifest.input))
    concrete = fn.get_concrete_function()
    ensemble = Ensemble(manifest, version_dir, tensorflow_run(concrete), "tensorflow", concrete, owner=model)
    pace()
    return warm_up(ensemble, warmup_sizes, pace)


