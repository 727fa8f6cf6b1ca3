"""The preprocessing of named table columns, built inside every member.

A client sends a row as its table holds it (`{"age": 41, "sex": "female", "bmi": null}`), so
each member takes one input per column and does its own preprocessing: what the training split
taught it (means, scales, vocabularies) is part of the SavedModel, and no client, server or
notebook has to repeat it.

- `numeric`: a float32 input. A missing value (NaN) is imputed with the training mean, and, if
  the training split had missing values in the column, a 0/1 indicator tells the model which
  values were imputed; the value is then standardised with the training statistics.
- `integer`: an integer category (a code) in a float64 input, so that a missing value can be
  NaN and every code up to 2**53 stays exact: one-hot over the codes seen in training, unseen
  codes and missing values sharing the out-of-vocabulary column, plus the missing indicator.
- `string`: a string category in a string input; the empty string is the missing value and
  is a category of its own when training had it. One-hot over the most frequent values (at
  most `MAX_VOCABULARY`, each seen at least twice when there are more); the rest share the
  out-of-vocabulary column.

Every column input is nullable in the manifest's terms (`contract.manifest.TensorSpec`): a
numeric column is imputed, a category counts a missing value as out of vocabulary, so a row
that misses a value is always answered.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import keras
import numpy as np

from contract.manifest import TensorSpec

KINDS = ("numeric", "integer", "string")
INPUT_DTYPES = {"numeric": "float32", "integer": "float64", "string": "string"}
# Past this many distinct values a string column is mostly identifiers or text: its one-hot
# keeps the most frequent values and folds the rest into the out-of-vocabulary column.
MAX_VOCABULARY = 256


@dataclass(frozen=True)
class ColumnStats:
    """What the training split says about one column: its kind, whether it had missing values,
    its mean and standard deviation (numeric) or its vocabulary (categories)."""

    name: str
    kind: str
    has_missing: bool
    mean: float = 0.0
    std: float = 1.0
    vocabulary: tuple = ()

    def spec(self) -> TensorSpec:
        """The column's input as the manifest lists it: one value per row, missing allowed."""
        return TensorSpec(name=self.name, dtype=INPUT_DTYPES[self.kind], shape=(), nullable=True)


def vocabulary_of(values: np.ndarray, limit: int = MAX_VOCABULARY) -> tuple:
    """The values a one-hot keeps, most frequent first (ties by value, for a stable order): all of
    them when there are at most `limit`, else the `limit` most frequent seen at least twice."""
    counts = Counter(values.tolist())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    if len(ranked) > limit:
        ranked = [item for item in ranked[:limit] if item[1] > 1]
    return tuple(value for value, _ in ranked)


def column_stats(name: str, kind: str, values: np.ndarray) -> ColumnStats:
    """A column's statistics from its training values (NaN, or "" for strings, is missing)."""
    if kind not in KINDS:
        raise ValueError(f"column {name!r}: unknown kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if kind == "string":
        text = np.asarray(values, dtype=object)
        return ColumnStats(name, kind, bool(np.any(text == "")), vocabulary=vocabulary_of(text))
    numbers = np.asarray(values, dtype=np.float64)
    present = numbers[~np.isnan(numbers)]
    has_missing = len(present) < len(numbers)
    if kind == "integer":
        return ColumnStats(name, kind, has_missing, vocabulary=tuple(int(v) for v in vocabulary_of(present)))
    mean = float(present.mean()) if len(present) else 0.0
    std = float(present.std()) if len(present) else 1.0
    return ColumnStats(name, kind, has_missing, mean, std if std > 1e-12 else 1.0)


@keras.saving.register_keras_serializable(package="ensemble")
class ImputeStandardize(keras.layers.Layer):
    """A numeric column (rows,) as (rows, 1) standardised values, NaN imputed with the mean, and
    the missing indicator as a second column when asked for."""

    def __init__(self, mean: float, std: float, indicator: bool, **kwargs):
        super().__init__(**kwargs)
        self.mean, self.std, self.indicator = float(mean), float(std), bool(indicator)

    def call(self, x):
        x = keras.ops.expand_dims(keras.ops.cast(x, "float32"), -1)
        missing = keras.ops.isnan(x)
        value = (keras.ops.where(missing, self.mean, x) - self.mean) / self.std
        if not self.indicator:
            return value
        return keras.ops.concatenate([value, keras.ops.cast(missing, "float32")], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape, 2 if self.indicator else 1)

    def get_config(self) -> dict:
        return {**super().get_config(), "mean": self.mean, "std": self.std, "indicator": self.indicator}


@keras.saving.register_keras_serializable(package="ensemble")
class MissingCode(keras.layers.Layer):
    """An integer-category column (float64, NaN missing) as int64 codes, a missing value as
    `code` (below every code of the vocabulary, so `IntegerLookup` sends it out of vocabulary),
    and its missing indicator (rows, 1)."""

    def __init__(self, code: int, **kwargs):
        super().__init__(**kwargs)
        self.code = int(code)

    def call(self, x):
        missing = keras.ops.isnan(x)
        codes = keras.ops.cast(keras.ops.where(missing, float(self.code), x), "int64")
        return codes, keras.ops.expand_dims(keras.ops.cast(missing, "float32"), -1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), (*input_shape, 1)

    def get_config(self) -> dict:
        return {**super().get_config(), "code": self.code}


def column_inputs(stats: list[ColumnStats]) -> dict[str, keras.KerasTensor]:
    """One Keras input per column, named after it, of the column's input dtype."""
    return {s.name: keras.Input(shape=(), dtype=INPUT_DTYPES[s.kind], name=s.name) for s in stats}


def encode(inputs: dict[str, keras.KerasTensor], stats: list[ColumnStats]):
    """Every column preprocessed and concatenated into one (rows, features) float tensor."""
    parts = []
    for s in stats:
        x = inputs[s.name]
        if s.kind == "numeric":
            parts.append(ImputeStandardize(s.mean, s.std, s.has_missing, name=f"impute_{s.name}")(x))
        elif s.kind == "integer":
            # Below every code: one for a missing value, one for the lookup's out-of-vocabulary
            # token (neither may be a category).
            lowest = min([0, *s.vocabulary])
            codes, missing = MissingCode(lowest - 1, name=f"missing_{s.name}")(x)
            lookup = keras.layers.IntegerLookup(vocabulary=list(s.vocabulary), output_mode="one_hot",
                                                oov_token=lowest - 2, name=f"lookup_{s.name}")
            parts.append(lookup(codes))
            if s.has_missing:
                parts.append(missing)
        else:
            lookup = keras.layers.StringLookup(vocabulary=list(s.vocabulary), output_mode="one_hot",
                                               name=f"lookup_{s.name}")
            parts.append(lookup(x))
    if len(parts) == 1:
        return parts[0]
    return keras.layers.Concatenate(name="features")(parts)


def as_inputs(columns: dict[str, np.ndarray], stats: list[ColumnStats]) -> dict[str, np.ndarray]:
    """A table's columns as the members' inputs take them: each at its input dtype (strings as
    an object array of `str`)."""
    return {s.name: np.asarray(columns[s.name], dtype=object if s.kind == "string" else INPUT_DTYPES[s.kind])
            for s in stats}
