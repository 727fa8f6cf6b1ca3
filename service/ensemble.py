"""Loading a version's members and assembling them into one averaging Keras model.

The members are SavedModels (`model.export`), reloaded as `keras.layers.TFSMLayer`s and joined
in a Functional-API model whose outputs are the (weighted) average and the stacked per-member
probabilities. One `tf.function` with a fixed input signature runs it: traced once, at load.
The service does not serve this function itself: `service.frozen` compiles it into one frozen
graph (`Ensemble.fn` in the server), and `service.lite` converts that to TensorFlow Lite, which
the server runs when the version converts (`Ensemble.lite`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from service.errors import InferenceFailed
from service.repository import InputSpec, Manifest, RepositoryError

log = logging.getLogger(__name__)

# A probability row must sum to one within this (float32 softmax and averaging round a little).
ROW_SUM_TOLERANCE = 1e-3
_WARMUP_SEED = 20240601


class LoadError(RepositoryError):
    """A version's members cannot be loaded, assembled or warmed up into a servable ensemble."""

    category = "load"


class SignatureError(LoadError):
    """A member's serving signature does not match the manifest's input spec."""

    category = "signature"


class WarmupError(LoadError):
    """The warm-up batch failed, or its outputs are not probability rows."""

    category = "warmup"


def check_probabilities(probs: np.ndarray, rows: int, classes: int, what: str) -> None:
    """Raise LoadError unless probs is (rows, classes), finite, in [0, 1], each row summing to 1."""
    if probs.shape != (rows, classes):
        raise WarmupError(f"{what} returned shape {list(probs.shape)}, expected [{rows}, {classes}]")
    if not np.all(np.isfinite(probs)):
        raise WarmupError(f"{what} returned non-finite values (NaN or infinity)")
    if np.any(probs < -ROW_SUM_TOLERANCE) or np.any(probs > 1 + ROW_SUM_TOLERANCE):
        raise WarmupError(f"{what} returned values outside [0, 1]: not probabilities")
    sums = probs.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > ROW_SUM_TOLERANCE:
        raise WarmupError(f"{what} returned rows that do not sum to 1 (row {worst} sums to {sums[worst]:.4f})")


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


def warmup_batch(spec: InputSpec, rows: int) -> np.ndarray:
    """A deterministic batch of the input spec's shape and dtype, for smoke tests and tracing."""
    rng = np.random.default_rng(_WARMUP_SEED)
    return rng.uniform(0.0, 1.0, size=(rows, *spec.shape)).astype(spec.dtype)


@dataclass(eq=False)
class Ensemble:
    """A loaded, verified, warmed version: call `predict` from any thread."""

    manifest: Manifest
    path: Path
    fn: tf.types.experimental.ConcreteFunction  # x -> (average, stacked member probabilities)
    owner: object = None  # keeps alive what `fn` reads (the Keras model's variables), if anything
    # The same ensemble converted to TensorFlow Lite (service.lite.LiteRunner): when set, it is
    # what `predict` runs; `fn` stays for whoever wants the TensorFlow function.
    lite: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    def __post_init__(self):
        self._call = flat_call(self.fn)

    @property
    def engine(self) -> str:
        return "tflite" if self.lite is not None else "tensorflow"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.output.classes

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(averaged probabilities (rows, classes), member probabilities (rows, members, classes))."""
        if self.lite is not None:
            average, members = self.lite(x)
        else:
            average, members = self._call(tf.constant(x))
            average, members = average.numpy(), members.numpy()
        if len(average) != len(x) or len(members) != len(x):
            raise InferenceFailed(
                f"{self.name} version {self.version} returned {len(average)} rows for {len(x)} inputs"
            )
        return average, members


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


def _no_pause() -> None:
    return None


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
    ensemble = Ensemble(manifest, version_dir, fn.get_concrete_function(), owner=model)
    pace()
    return warm_up(ensemble, warmup_sizes, pace)


def warm_up(ensemble: Ensemble, warmup_sizes: Sequence[int], pace: Callable[[], None] = _no_pause) -> Ensemble:
    """Run each batch size once (compiling it) and check every output is a probability row;
    raises WarmupError otherwise. Returns the ensemble."""
    manifest, spec = ensemble.manifest, ensemble.manifest.input
    n_classes, n_members = len(manifest.output.classes), len(manifest.members)
    for rows in sorted(set(warmup_sizes)):
        try:
            average, members = ensemble.predict(warmup_batch(spec, rows))
        except Exception as exc:  # a member that fails on a valid batch is a broken version
            raise WarmupError(f"warm-up on {rows} rows failed: {exc}") from None
        if members.shape != (rows, n_members, n_classes):
            raise WarmupError(
                f"members returned shape {list(members.shape)}, expected [{rows}, {n_members}, {n_classes}] "
                f"(one row of {n_classes} class probabilities per input)"
            )
        for i, member in enumerate(manifest.members):
            check_probabilities(members[:, i, :], rows, n_classes, f"member {member.name}")
        check_probabilities(average, rows, n_classes, "the ensemble")
        pace()
    log.debug("%s version %d: %d members, warmed on %s rows", manifest.name, manifest.version,
              n_members, sorted(set(warmup_sizes)))
    return ensemble
