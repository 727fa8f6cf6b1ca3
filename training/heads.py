"""The output of a trained member for each task, and the loss it is trained on.

What a member emits for its head is what `contract.tasks` combines (and what the importer
checks imported members against):

- `classification`: k softmax probabilities, sparse categorical cross-entropy;
- `binary`: one sigmoid probability of the positive label, binary cross-entropy;
- `multilabel`: k independent sigmoid probabilities, binary cross-entropy per label;
- `regression`: a Gaussian head (Lakshminarayanan et al. 2017): k means then k variances,
  trained on the Gaussian negative log-likelihood. The targets are standardised inside the loss
  (the training split's mean and standard deviation) and the head's raw outputs are mapped back
  inside the model, so the member answers in the targets' own units and the optimiser sees
  numbers near one whatever the units.
"""

from __future__ import annotations

import keras
import numpy as np

# A variance never reaches zero: the NLL of a member certain of a value would be infinite.
MIN_VARIANCE = 1e-6


def objective_of(task: str) -> str:
    """What the search ranks trials by: validation accuracy for classes, validation loss (the
    NLL of the task) otherwise."""
    return "val_accuracy" if task == "classification" else "val_loss"


@keras.saving.register_keras_serializable(package="ensemble")
class GaussianHead(keras.layers.Layer):
    """(rows, 2k) raw outputs as k means and k variances in the targets' units: mean =
    mu * scale + offset, variance = (softplus(v) + MIN_VARIANCE) * scale**2."""

    def __init__(self, offset, scale, **kwargs):
        super().__init__(**kwargs)
        self.offset = [float(v) for v in np.ravel(offset)]
        self.scale = [float(v) for v in np.ravel(scale)]

    def call(self, raw):
        k = len(self.offset)
        offset, scale = keras.ops.array(self.offset), keras.ops.array(self.scale)
        mean = raw[:, :k] * scale + offset
        variance = (keras.ops.softplus(raw[:, k:]) + MIN_VARIANCE) * scale ** 2
        return keras.ops.concatenate([mean, variance], axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "offset": self.offset, "scale": self.scale}


@keras.saving.register_keras_serializable(package="ensemble")
class GaussianNLL(keras.losses.Loss):
    """The mean Gaussian negative log-likelihood of the targets under (k means, k variances),
    both standardised by the training targets' scale first (constant terms dropped)."""

    def __init__(self, scale, name: str = "gaussian_nll", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = [float(v) for v in np.ravel(scale)]

    def call(self, y_true, y_pred):
        k = len(self.scale)
        scale = keras.ops.array(self.scale)
        error = (keras.ops.cast(y_true, y_pred.dtype) - y_pred[:, :k]) / scale
        variance = y_pred[:, k:] / scale ** 2
        return keras.ops.mean(0.5 * (keras.ops.log(variance) + error ** 2 / variance), axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


def target_stats(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard deviation) of each regression target over the training rows; a constant
    target gets a standard deviation of one."""
    values = np.asarray(target, dtype=np.float64).reshape(len(target), -1)
    std = values.std(axis=0)
    return values.mean(axis=0), np.where(std > 1e-12, std, 1.0)


class Head:
    """One task's output layer and loss, for a head of `width` labels (classes, labels or
    targets), named `name`; regression needs the training targets' statistics."""

    def __init__(self, task: str, width: int, name: str, target: np.ndarray | None = None):
        self.task, self.width, self.name = task, width, name
        if task == "regression":
            if target is None:
                raise ValueError("a regression head needs the training targets' statistics")
            self.offset, self.scale = target_stats(target)

    def output(self, x):
        """The head's output tensor on the body's last layer `x`; its layers are named `head-...`,
        a name no input or automatically named layer has (the export keys it by the head's name)."""
        layer = f"head-{self.name}"
        if self.task == "classification":
            return keras.layers.Dense(self.width, activation="softmax", name=layer)(x)
        if self.task == "binary":
            return keras.layers.Dense(1, activation="sigmoid", name=layer)(x)
        if self.task == "multilabel":
            return keras.layers.Dense(self.width, activation="sigmoid", name=layer)(x)
        raw = keras.layers.Dense(2 * self.width, name=f"{layer}-raw")(x)
        return GaussianHead(self.offset, self.scale, name=layer)(raw)

    def loss(self):
        """The loss the head trains on: the negative log-likelihood of its task."""
        if self.task == "classification":
            return "sparse_categorical_crossentropy"
        if self.task in ("binary", "multilabel"):
            return "binary_crossentropy"
        return GaussianNLL(self.scale)

    def metrics(self) -> list:
        """What Keras reports while training (accuracy for labels; none for regression, whose
        loss is its NLL)."""
        return {"classification": ["accuracy"], "binary": ["binary_accuracy"],
                "multilabel": ["binary_accuracy"]}.get(self.task, [])

    def fit_target(self, target: np.ndarray) -> np.ndarray:
        """The target as Keras fits it: class indices, (rows, 1) for binary, as given otherwise."""
        if self.task == "binary":
            return np.asarray(target, dtype=np.float32).reshape(-1, 1)
        if self.task in ("multilabel", "regression"):
            return np.asarray(target, dtype=np.float32).reshape(len(target), -1)
        return np.asarray(target)
