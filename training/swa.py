"""Stochastic weight averaging (Izmailov et al. 2018) as a Keras 3 callback.

From `start_epoch` on, after every epoch, the running average of the trainable weights is
updated: w_swa <- (w_swa * n + w) / (n + 1). After training, `apply_to` puts the average into
the model and `recompute_batch_norm` recomputes the batch-normalisation statistics for it,
since the moving averages collected during training belong to other weights.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np


def running_average(average: np.ndarray, value: np.ndarray, n: int) -> np.ndarray:
    """The mean of n+1 values, given the mean of the first n and the next value."""
    return (average * n + value) / (n + 1)


class StochasticWeightAveraging(keras.callbacks.Callback):
    """Keeps the running average of the trainable weights from `start_epoch` (0-based) on."""

    def __init__(self, start_epoch: int, state_path: Path | None = None):
        super().__init__()
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be at least 0, got {start_epoch}")
        self.start_epoch = start_epoch
        # With BackupAndRestore, a resumed run must resume the average too: it is saved here.
        self.state_path = state_path
        self.count = 0
        self.average: list[np.ndarray] | None = None

    def on_train_begin(self, logs=None):
        if self.state_path is not None and self.state_path.exists():
            with np.load(self.state_path) as saved:
                self.count = int(saved["count"])
                self.average = [saved[f"w{i}"] for i in range(len(saved.files) - 1)]

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.start_epoch:
            return
        current = [np.asarray(w, dtype="float64") for w in self._weights()]
        if self.average is None:
            self.average = current
        else:
            self.average = [running_average(a, w, self.count) for a, w in zip(self.average, current)]
        self.count += 1
        if self.state_path is not None:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(self.state_path, count=self.count, **{f"w{i}": a for i, a in enumerate(self.average)})

    def apply_to(self, model: keras.Model) -> None:
        """Replace the model's trainable weights by their average."""
        if self.average is None:
            raise RuntimeError("no epoch reached start_epoch: there is nothing to average")
        for variable, value in zip(model.trainable_weights, self.average):
            variable.assign(value.astype(variable.dtype))

    def _weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.model.trainable_weights]


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """BatchNormalization layers in the order the Functional model calls them."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def recompute_batch_norm(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> int:
    """Set every BatchNormalization layer's moving statistics to the population mean and
    variance of its inputs over x, layer by layer (earlier layers already recomputed).
    Returns the number of layers updated."""
    layers = batch_norm_layers(model)
    for layer in layers:
        probe = keras.Model(model.input, layer.input)
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(x), batch_size):
            h = np.asarray(probe(x[start : start + batch_size], training=False), dtype="float64")
            h = np.moveaxis(h, axis, -1).reshape(-1, h.shape[axis])
            total = total + h.sum(axis=0)
            total_sq = total_sq + (h * h).sum(axis=0)
            count += len(h)
        mean = total / count
        variance = np.maximum(total_sq / count - mean * mean, 0.0)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    return len(layers)
