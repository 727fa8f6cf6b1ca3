"""A version's members loaded from their SavedModels and assembled into one averaging model.

The members are SavedModels (`model.export`), reloaded as `keras.layers.TFSMLayer`s and joined
in a Functional-API model whose outputs are the (weighted) average, tempered when the version is
calibrated (`Temperature`), the stacked per-member probabilities, and each row's uncertainty
scores with its abstain flag (`Uncertainty`, contract.scores in the graph, so that every engine
computes them in its own kernels, batch by batch). One `tf.function` with a
fixed input signature runs it, traced once. This is the reference every compiled engine is
checked against (`compile`); servers do not run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from service.engines.base import Ensemble, LoadError, no_pause, warm_up
from service.engines.tensorflow import TensorFlowEngine, input_signature
from contract.manifest import InputSpec, Manifest
from contract.scores import LOG_FLOOR, SCORES


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


def _combine(outputs: list, weights: Sequence[float]):
    """Plain mean when the weights are equal (keras.layers.Average), weighted sum otherwise."""
    if len(outputs) == 1:
        return outputs[0]
    if np.allclose(weights, weights[0]):
        return keras.layers.Average(name="average")(outputs)
    scaled = [keras.layers.Rescaling(float(w), name=f"weight_{i}")(o) for i, (o, w) in enumerate(zip(outputs, weights))]
    return keras.layers.Add(name="weighted_average")(scaled)


class Temperature(keras.layers.Layer):
    """The calibration after the average: softmax(log(max(p, LOG_FLOOR)) / T), in log space so
    a probability of 0 stays finite; `contract.scores.temper` is the same in NumPy."""

    # Keras reads a layer's __init__ signature (getfullargspec): mutmut's trampoline would hide it.
    def __init__(self, temperature: float, **kwargs):  # pragma: no mutate block
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities):
        logits = keras.ops.log(keras.ops.maximum(probabilities, LOG_FLOOR))
        return keras.ops.softmax(logits * (1.0 / self.temperature), axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}


class Uncertainty(keras.layers.Layer):
    """(served probabilities, stacked members) -> (rows, 4): entropy of the served distribution,
    the members' weighted mean entropy, their mutual information (contract.scores, never
    negative), and 1.0 where the version's abstention score is above its threshold."""

    def __init__(self, weights: Sequence[float], abstain_score: str | None = None, threshold: float = 0.0,
                 **kwargs):  # pragma: no mutate block (as Temperature's)
        super().__init__(**kwargs)
        self.member_weights = [float(w) for w in weights]
        self.abstain_score, self.threshold = abstain_score, float(threshold)

    @staticmethod
    def _entropy(p):
        return -keras.ops.sum(p * keras.ops.log(keras.ops.maximum(p, LOG_FLOOR)), axis=-1)

    def call(self, inputs):
        served, members = inputs
        w = keras.ops.convert_to_tensor(self.member_weights, dtype=members.dtype)
        expected = keras.ops.sum(self._entropy(members) * w, axis=-1)
        mean = keras.ops.sum(members * w[None, :, None], axis=1)
        mutual = keras.ops.maximum(self._entropy(mean) - expected, 0.0)
        scores = keras.ops.stack([self._entropy(served), expected, mutual], axis=-1)
        if self.abstain_score is None:
            flag = keras.ops.zeros_like(expected)
        else:
            flag = keras.ops.cast(scores[:, SCORES.index(self.abstain_score)] > self.threshold, scores.dtype)
        return keras.ops.concatenate([scores, flag[:, None]], axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "weights": self.member_weights, "abstain_score": self.abstain_score,
                "threshold": self.threshold}


def assemble(manifest: Manifest, version_dir: Path, pace: Callable[[], None] = no_pause) -> keras.Model:
    """Reload every member and build the averaging Functional model; checks each signature.
    `pace` is called between steps (the manager's loader uses it to share the CPU)."""
    spec = manifest.input
    inputs = keras.Input(shape=spec.shape, dtype=spec.dtype, name="instances")
    outputs = []
    for member in manifest.members:
        try:
            # A layer casts a float input to its own dtype (float32 by default), which a member of
            # float64 inputs refuses: the layer takes the input's dtype when it is a float.
            layer = keras.layers.TFSMLayer(str(version_dir / member.path), call_endpoint="serve",
                                           name=f"member_{member.name}".replace("-", "_"),
                                           dtype=spec.dtype if spec.dtype.startswith("float") else None)
        except Exception as exc:  # TF raises many types for unreadable SavedModels
            raise LoadError(f"member {member.name}: cannot load SavedModel: {exc}") from None
        check_signature(member.name, layer.call_endpoint_fn.input_signature, spec)
        outputs.append(layer(inputs))
        pace()
    average = _combine(outputs, manifest.weights)
    if manifest.temperature != 1.0:
        average = Temperature(manifest.temperature, name="temperature")(average)
    stacked = keras.layers.Concatenate(axis=1, name="members")(
        [keras.layers.Reshape((1, -1))(o) for o in outputs]
    )
    abstention = manifest.abstention
    scores = Uncertainty(manifest.weights, abstention.score if abstention else None,
                         abstention.threshold if abstention else 0.0, name="uncertainty")([average, stacked])
    return keras.Model(inputs, [average, stacked, scores], name=f"{manifest.name}_v{manifest.version}")


def load_members(manifest: Manifest, version_dir: Path, warmup_sizes: Sequence[int],
                 pace: Callable[[], None] = no_pause) -> Ensemble:
    """Assemble, trace and smoke-test a version. Raises LoadError with the reason on any problem."""
    model = assemble(manifest, version_dir, pace)
    fn = tf.function(lambda x: model(x, training=False), input_signature=input_signature(manifest.input))
    ensemble = Ensemble(manifest, version_dir, TensorFlowEngine(fn.get_concrete_function(), owner=model))
    pace()
    return warm_up(ensemble, warmup_sizes, pace)


