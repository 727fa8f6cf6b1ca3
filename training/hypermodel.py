"""The search spaces: Keras Tuner HyperModels that fit their architecture to the data.

Arrays (format 1): images (height, width, channels) get a small convolutional network, anything
else a dense one; every model starts with a Normalization layer holding the training split's
statistics, so the exported SavedModel takes raw values and clients never need to know the
scaling. Tables (format 2): one input per named column, preprocessed inside the model
(`training.features`; a text column's vocabulary size, embedding and encoder are searched too),
a dense body, and the head of the table's task (`training.heads`).
"""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np

from training.features import ColumnStats, column_inputs, encode
from training.heads import Head


# Part of the tuner's project name: a changed search space must not resume an old search.
SEARCH_SPACE_VERSION = 3


def is_image(input_shape: tuple[int, ...]) -> bool:
    """A rank-3 instance (height, width, channels) is treated as an image."""
    return len(input_shape) == 3


class EnsembleHyperModel(kt.HyperModel):
    """Builds a compiled softmax classifier for one set of hyperparameters."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        mean: np.ndarray,
        variance: np.ndarray,
    ):
        super().__init__(name="ensemble_member")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.mean = np.asarray(mean, dtype="float32")
        self.variance = np.asarray(variance, dtype="float32")

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        inputs = keras.Input(shape=self.input_shape, name="instances")
        x = keras.layers.Normalization(mean=self.mean, variance=self.variance)(inputs)
        if is_image(self.input_shape):
            x = self._conv_body(hp, x)
        else:
            x = self._dense_body(hp, x)
        outputs = keras.layers.Dense(self.num_classes, activation="softmax", name="probabilities")(x)
        model = keras.Model(inputs, outputs)
        self.compile(model, keras.optimizers.Adam(learning_rate(hp)))
        return model

    def compile(self, model: keras.Model, optimizer) -> None:
        """Compile a model of this space with `optimizer` (snapshot members swap in a schedule)."""
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    def _conv_body(self, hp: kt.HyperParameters, x):
        # Shifts of up to an eighth of the image, active in training only: cheap extra data.
        x = keras.layers.RandomTranslation(0.125, 0.125, fill_mode="constant")(x)
        filters = hp.Choice("filters", [16, 32, 64])
        batch_norm = hp.Boolean("batch_norm")
        for block in range(hp.Int("conv_blocks", 1, 2)):
            x = keras.layers.Conv2D(filters * 2**block, 3, padding="same", use_bias=not batch_norm)(x)
            if batch_norm:
                x = keras.layers.BatchNormalization()(x)
            x = keras.layers.Activation("relu")(x)
            # Pool only while the map is big enough; 8x8 digits allow two halvings.
            if min(x.shape[1], x.shape[2]) >= 4:
                x = keras.layers.MaxPooling2D(2)(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dropout(hp.Float("dropout", 0.0, 0.5, step=0.1))(x)
        return keras.layers.Dense(hp.Choice("dense_units", [32, 64, 128]), activation="relu")(x)

    def _dense_body(self, hp: kt.HyperParameters, x):
        if len(self.input_shape) > 1:
            x = keras.layers.Flatten()(x)
        return dense_body(hp, x)


def learning_rate(hp: kt.HyperParameters) -> float:
    """Adam's learning rate, searched on a log scale."""
    return hp.Float("learning_rate", 1e-4, 1e-2, sampling="log")


def dense_body(hp: kt.HyperParameters, x, prefix: str | None = None):
    """One to three ReLU layers of the same width, each followed by dropout; with a `prefix`, the
    layers are named after it (`body-dense-0`), else Keras names them."""
    units = hp.Choice("units", [32, 64, 128, 256])
    dropout = hp.Float("dropout", 0.0, 0.5, step=0.1)
    for i in range(hp.Int("dense_layers", 1, 3)):
        named = (lambda kind: {"name": f"{prefix}{kind}-{i}"}) if prefix else (lambda kind: {})  # noqa: E731
        x = keras.layers.Dense(units, activation="relu", **named("dense"))(x)
        x = keras.layers.Dropout(dropout, **named("dropout"))(x)
    return x


class TableHyperModel(kt.HyperModel):
    """A member for a table: one input per column (`training.features`), a dense body (searched
    with or without a wide path from the features to the head), and the head of the table's
    task (`training.heads`)."""

    def __init__(self, columns: list[ColumnStats], head: Head):
        super().__init__(name="ensemble_member")
        if not columns:
            raise ValueError("a table member needs at least one feature column")
        self.columns = list(columns)
        self.head = head

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        inputs = column_inputs(self.columns)
        features = encode(inputs, self.columns, hp)
        x = dense_body(hp, features, prefix="body-")
        if hp.Boolean("wide"):
            # Wide and deep (Cheng et al. 2016): the head also sees the features themselves, so a
            # member can be as good as a linear model where the table is mostly linear.
            x = keras.layers.Concatenate(name="wide-and-deep")([features, x])
        model = keras.Model(inputs, self.head.output(x))
        self.compile(model, keras.optimizers.Adam(learning_rate(hp)))
        return model

    def compile(self, model: keras.Model, optimizer) -> None:
        """Compile a model of this space with `optimizer` (snapshot members swap in a schedule)."""
        model.compile(optimizer=optimizer, loss=self.head.loss(), metrics=self.head.metrics())
