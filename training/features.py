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
- `text`: free text in a string input; the empty string is the missing (empty) text.
  `TextVectorization` (lower case, punctuation stripped, split on white space) turns it into
  token ids over the training split's most frequent words, padded or cut to a fixed length (the
  95th percentile of the training texts' lengths, at most `MAX_TEXT_LENGTH`: a fixed shape
  exports and serves as plainly as any other). The encoder is searched: the mean of the
  tokens' embeddings (padding left out; zeros for an empty text), a `Conv1D` over them and a
  global max pool, or the bag of words (which words occur: a linear model of them in the dense
  body, often the strongest on short texts and few examples). The vocabulary is computed once
  per run (`column_stats`), for the largest vocabulary searched; each member takes the most
  frequent `text_max_tokens` of it, so every trial and member of a run tokenises alike and its
  SavedModel carries the words it knows.

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
from training.data import DataError
from training.tables import NULL_SPELLINGS

KINDS = ("numeric", "integer", "string", "text")
INPUT_DTYPES = {"numeric": "float32", "integer": "float64", "string": "string", "text": "string"}
# Past this many distinct values a string column is mostly identifiers or text: its one-hot
# keeps the most frequent values and folds the rest into the out-of-vocabulary column.
MAX_VOCABULARY = 256
# The text search space (training.hypermodel searches it only for tables with a text column).
TEXT_MAX_TOKENS = (5_000, 10_000, 20_000)  # the vocabulary's size, its padding and unknown-word ids included
TEXT_EMBEDDING = (32, 64, 128)
TEXT_ENCODERS = ("mean", "convolution", "bag")
TEXT_STANDARDIZE = "lower_and_strip_punctuation"
# Texts are cut at this many tokens: the first 256 words carry most of what a short text says,
# and the members' cost grows with the length.
MAX_TEXT_LENGTH = 256
TEXT_LENGTH_PERCENTILE = 95
CONVOLUTION_WIDTH = 5


@dataclass(frozen=True)
class ColumnStats:
    """What the training split says about one column: its kind, whether it had missing values,
    its mean and standard deviation (numeric), its vocabulary (categories; the words of a text,
    most frequent first) and, for text, the length in tokens every text is padded or cut to."""

    name: str
    kind: str
    has_missing: bool
    mean: float = 0.0
    std: float = 1.0
    vocabulary: tuple = ()
    length: int = 0

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
        vocabulary = vocabulary_of(text)
        if not vocabulary:
            raise DataError(f"column {name!r}: none of its {len(set(text.tolist()))} distinct training values "
                            "repeats, so a category has nothing to learn from: an identifier? leave it out with "
                            "--ignore-columns (or --text-columns if it is free text)")
        return ColumnStats(name, kind, bool(np.any(text == "")), vocabulary=vocabulary)
    if kind == "text":
        text = np.asarray(values, dtype=object)
        words, lengths = text_vocabulary(text)
        if not words:
            raise DataError(f"column {name!r}: its training texts hold no words (after lower-casing and stripping "
                            "punctuation); leave it out")
        return ColumnStats(name, kind, bool(np.any(text == "")), vocabulary=words,
                           length=text_length(lengths))
    numbers = np.asarray(values, dtype=np.float64)
    present = numbers[~np.isnan(numbers)]
    has_missing = len(present) < len(numbers)
    if not len(present):
        raise DataError(f"column {name!r}: no training row has a value; leave it out with --ignore-columns")
    if kind == "integer":
        return ColumnStats(name, kind, has_missing, vocabulary=tuple(int(v) for v in vocabulary_of(present)))
    std = float(present.std())
    return ColumnStats(name, kind, has_missing, float(present.mean()), std if std > 1e-12 else 1.0)


def text_vocabulary(texts: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """(the words of these texts, most frequent first, as many as the largest vocabulary searched
    holds; each text's length in tokens), tokenised as the members tokenise."""
    import tensorflow as tf

    layer = keras.layers.TextVectorization(max_tokens=max(TEXT_MAX_TOKENS), standardize=TEXT_STANDARDIZE)
    batches = tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), dtype=tf.string)).batch(1024)
    layer.adapt(batches)
    # Ids 0 and 1 are the padding and the unknown word: the words follow, most frequent first
    # (ties in a fixed order), which is the order a smaller vocabulary keeps the head of.
    words = tuple(str(w) for w in layer.get_vocabulary()[2:])
    if not words:  # no text holds a word: the layer has no table to look up
        return words, np.zeros(len(texts), dtype=np.int64)
    # Every word is in the vocabulary or unknown (id 1), so a text's tokens are its non-zero ids.
    return words, np.concatenate([np.count_nonzero(layer(batch).numpy(), axis=1) for batch in batches])


def text_length(lengths: np.ndarray) -> int:
    """The length in tokens every text is padded or cut to: the `TEXT_LENGTH_PERCENTILE`th
    percentile of the training texts' lengths, between 1 and `MAX_TEXT_LENGTH`."""
    if not len(lengths):
        return 1
    return int(min(MAX_TEXT_LENGTH, max(1, np.ceil(np.percentile(lengths, TEXT_LENGTH_PERCENTILE)))))


@keras.saving.register_keras_serializable(package="ensemble")
class TokenMean(keras.layers.Layer):
    """The mean of a text's embedded tokens, (rows, length, dim) and their ids (rows, length) in,
    (rows, dim) out, padding (id 0) left out; an empty text is all zeros (a masked
    `GlobalAveragePooling1D` divides by zero there)."""

    def call(self, inputs):
        embedded, ids = inputs
        present = keras.ops.expand_dims(keras.ops.cast(keras.ops.not_equal(ids, 0), embedded.dtype), -1)
        count = keras.ops.maximum(keras.ops.sum(present, axis=1), 1.0)
        return keras.ops.sum(embedded * present, axis=1) / count

    def compute_output_shape(self, input_shape):
        embedded, _ = input_shape
        return (embedded[0], embedded[2])


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


@keras.saving.register_keras_serializable(package="ensemble")
class CleanStrings(keras.layers.Layer):
    """A string column's values as the trainer read them (`training.tables`): surrounding spaces
    stripped, and every spelling of a missing value (`NULL_SPELLINGS`) the empty string, so a
    client that sends a cell exactly as its CSV holds it (` Private`, `?`) gets the category the
    members learnt for it."""

    def call(self, x):
        import tensorflow as tf

        x = tf.strings.strip(x)
        null = tf.reduce_any(tf.equal(tf.expand_dims(x, -1), tf.constant(NULL_SPELLINGS)), axis=-1)
        return tf.where(null, tf.constant(""), x)

    def compute_output_shape(self, input_shape):
        return input_shape


def column_inputs(stats: list[ColumnStats]) -> dict[str, keras.KerasTensor]:
    """One Keras input per column, named after it, of the column's input dtype. Every other layer
    of a table's member has a `-` in its name (`impute-age`, `body-dense-0`, `head-price`), which
    no column's input name has (`training.table_pipeline.safe_name`): no name is used twice."""
    return {s.name: keras.Input(shape=(), dtype=INPUT_DTYPES[s.kind], name=s.name) for s in stats}


def encode(inputs: dict[str, keras.KerasTensor], stats: list[ColumnStats], hp):
    """Every column preprocessed and concatenated into one (rows, features) float tensor; `hp`
    (Keras Tuner's hyperparameters) chooses how text columns are encoded."""
    parts = []
    for s in stats:
        x = inputs[s.name]
        if s.kind in ("text", "string"):
            x = CleanStrings(name=f"clean-{s.name}")(x)
        if s.kind == "text":
            parts.append(encode_text(x, s, hp))
        elif s.kind == "numeric":
            parts.append(ImputeStandardize(s.mean, s.std, s.has_missing, name=f"impute-{s.name}")(x))
        elif s.kind == "integer":
            # Below every code: one for a missing value, one for the lookup's out-of-vocabulary
            # token (neither may be a category).
            lowest = min([0, *s.vocabulary])
            codes, missing = MissingCode(lowest - 1, name=f"missing-{s.name}")(x)
            lookup = keras.layers.IntegerLookup(vocabulary=list(s.vocabulary), output_mode="one_hot",
                                                oov_token=lowest - 2, name=f"lookup-{s.name}")
            parts.append(lookup(codes))
            if s.has_missing:
                parts.append(missing)
        else:
            lookup = keras.layers.StringLookup(vocabulary=list(s.vocabulary), output_mode="one_hot",
                                               name=f"lookup-{s.name}")
            parts.append(lookup(x))
    if len(parts) == 1:
        return parts[0]
    return keras.layers.Concatenate(name="features-all")(parts)


def encode_text(x: keras.KerasTensor, s: ColumnStats, hp) -> keras.KerasTensor:
    """A text column as (rows, features) over the run's vocabulary: the bag of its words, or
    token ids embedded then averaged, or convolved and max-pooled; each choice searched."""
    max_tokens = hp.Choice("text_max_tokens", list(TEXT_MAX_TOKENS))
    encoder = hp.Choice("text_encoder", list(TEXT_ENCODERS))
    with hp.conditional_scope("text_encoder", ["mean", "convolution"]):
        dimension = hp.Choice("text_embedding", list(TEXT_EMBEDDING))
    words = list(s.vocabulary[: max_tokens - 2])
    if encoder == "bag":
        # multi_hot is already float32 (and a bare keras.ops call would add an operation named
        # after it, `cast`, which a column may be named too).
        return keras.layers.TextVectorization(vocabulary=words, standardize=TEXT_STANDARDIZE, output_mode="multi_hot",
                                              name=f"vectorize-{s.name}")(x)
    ids = keras.layers.TextVectorization(vocabulary=words, standardize=TEXT_STANDARDIZE,
                                         output_sequence_length=s.length, name=f"vectorize-{s.name}")(x)
    embedded = keras.layers.Embedding(len(words) + 2, dimension, name=f"embed-{s.name}")(ids)
    if encoder == "mean":
        return TokenMean(name=f"mean-{s.name}")([embedded, ids])
    convolved = keras.layers.Conv1D(dimension, CONVOLUTION_WIDTH, padding="same", activation="relu",
                                    name=f"convolve-{s.name}")(embedded)
    return keras.layers.GlobalMaxPooling1D(name=f"pool-{s.name}")(convolved)


def as_inputs(columns: dict[str, np.ndarray], stats: list[ColumnStats]) -> dict[str, np.ndarray]:
    """A table's columns as the members' inputs take them: each at its input dtype (strings as
    an object array of `str`)."""
    return {s.name: np.asarray(columns[s.name], dtype=object if INPUT_DTYPES[s.kind] == "string"
                               else INPUT_DTYPES[s.kind])
            for s in stats}
