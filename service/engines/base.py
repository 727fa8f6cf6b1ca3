"""The engine interface, the servable `Ensemble`, and the checks every engine passes.

An `Engine` computes a version: rows in, a tuple of arrays out, which `Ensemble.answer` names
(service.answer). For a format-1 version: (averaged probabilities, per-member probabilities,
uncertainty scores), the scores computed in the engine's own graph (`SCORE_COLUMNS`), on
TensorFlow Lite (`lite`, the default) or the frozen TensorFlow graph (`tensorflow`); a third,
the members assembled with Keras (`keras_members`), is what the other two are checked against
when a version is compiled. A format-2 version (named inputs, heads with tasks) runs on its
members' signatures (`named`), its heads combined after it. An `Ensemble` is a version's manifest and
its engine: what the manager holds and the batcher calls. Nothing here imports TensorFlow, so a
server whose versions all run on TensorFlow Lite never does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from service.batching import rows_of
from service.errors import InferenceFailed
from contract.manifest import HeadSpec, InputSpec, Manifest, RepositoryError, TensorSpec
from service.answer import SCORE_COLUMNS, Answer, combine

log = logging.getLogger(__name__)

# A probability row must sum to one within this (float32 softmax and averaging round a little).
ROW_SUM_TOLERANCE = 1e-3
WARMUP_SEED = 20240601  # every engine's warm-up batches (named's too)


class LoadError(RepositoryError):
    """A version's members cannot be loaded, assembled or warmed up into a servable ensemble."""

    category = "load"


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


def warmup_batch(spec: InputSpec, rows: int) -> np.ndarray:
    """A deterministic batch of the input spec's shape and dtype, for smoke tests and tracing."""
    rng = np.random.default_rng(WARMUP_SEED)
    return rng.uniform(0.0, 1.0, size=(rows, *spec.shape)).astype(spec.dtype)


class Engine(Protocol):
    """What computes a version. `kind` names it ("tflite" or "tensorflow") for GET /models and
    the logs; `run` may be called from several threads at once."""

    kind: str

    def run(self, x: np.ndarray | dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """Rows (n, *input shape), or named inputs of n rows each -> arrays of n rows (format 1:
        averaged (n, classes), per member (n, members, classes), scores (n, len(SCORE_COLUMNS)))."""
        ...


@dataclass(eq=False)
class Ensemble:
    """A loaded, verified, warmed version: its manifest and its engine. `predict` from any thread."""

    manifest: Manifest
    path: Path
    engine: Engine

    def __post_init__(self) -> None:
        self.member_names = tuple(m.name for m in self.manifest.members)
        self.signature = self.manifest.signature()  # its inputs and heads, in either format

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
        """The one input of a format-1 version (a format-2 version's inputs are in `signature`)."""
        if self.manifest.format_version != 1:
            raise TypeError(f"{self.name} version {self.version} takes named inputs (manifest format 2): "
                            "read its signature, not input_spec")
        return self.manifest.input

    def predict(self, x: np.ndarray | dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """The outputs for the rows x (one array, or named arrays for a format-2 version), each
        rows first; `answer` names them. Format 1: the engine's (averaged probabilities (rows,
        classes), member probabilities (rows, members, classes), scores (rows,
        len(SCORE_COLUMNS))). Format 2: the engine's outputs combined per head by its task
        (service.answer.combine), here on the batcher's inference thread, once per batch."""
        outputs = self.engine.run(x)
        rows = rows_of(x)
        for output in outputs:
            if len(output) != rows:
                raise InferenceFailed(f"{self.name} version {self.version} returned {len(output)} rows for "
                                      f"{rows} inputs")
        return outputs if self.manifest.format_version == 1 else combine(self.manifest, outputs)

    def answer(self, outputs: Sequence[np.ndarray]) -> Answer:
        """The typed answer (service.answer) in `predict`'s outputs for some rows."""
        return Answer.of(self.manifest, outputs, self.member_names)


def no_pause() -> None:
    """The default `pace` of loading steps: go straight on."""
    return None


def warm_up(ensemble: Ensemble, warmup_sizes: Sequence[int], pace: Callable[[], None] = no_pause) -> Ensemble:
    """Run each batch size once (compiling it) and check every output is a probability row;
    raises WarmupError otherwise. Returns the ensemble."""
    manifest, spec = ensemble.manifest, ensemble.manifest.input
    n_classes, n_members = len(manifest.output.classes), len(manifest.members)
    for rows in sorted(set(warmup_sizes)):
        try:
            average, members, scores = ensemble.predict(warmup_batch(spec, rows))
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
        if scores.shape != (rows, len(SCORE_COLUMNS)) or not np.all(np.isfinite(scores)):
            raise WarmupError(f"the uncertainty scores have shape {list(scores.shape)} or are not finite; "
                              f"expected [{rows}, {len(SCORE_COLUMNS)}] finite values")
        pace()
    log.debug("%s version %d: %d members, warmed on %s rows", manifest.name, manifest.version,
              n_members, sorted(set(warmup_sizes)))
    return ensemble


# -- format 2: named inputs, heads with tasks ---------------------------------------------------

_VARIABLE_LENGTH = 4  # the length a variable dimension gets in the warm-up batch


def warmup_inputs(specs: Sequence[TensorSpec], rows: int) -> dict[str, np.ndarray]:
    """A deterministic batch of every input: numbers in [0, 1) (integers 1), False, the string
    "warm up"; a variable dimension of length _VARIABLE_LENGTH. A nullable input holds its
    missing value (NaN, the empty string) in every odd row, so the checks that follow (finite
    answers, the compiled engine against the members) cover the rows clients send with gaps."""
    rng = np.random.default_rng(WARMUP_SEED)
    batch = {}
    for spec in specs:
        shape = (rows, *(d if d is not None else _VARIABLE_LENGTH for d in spec.shape))
        if spec.dtype == "string":
            batch[spec.name] = np.full(shape, b"warm up", dtype=object)
        elif spec.dtype == "bool":
            batch[spec.name] = np.zeros(shape, dtype=bool)
        elif spec.dtype.startswith(("int", "uint")):
            batch[spec.name] = np.ones(shape, dtype=spec.dtype)
        else:
            batch[spec.name] = rng.uniform(0.0, 1.0, size=shape).astype(spec.dtype)
        if spec.nullable:
            batch[spec.name][1::2] = b"" if spec.dtype == "string" else np.nan
    return batch


def check_head(head: HeadSpec, values: np.ndarray, rows: int, members: int, what: str) -> None:
    """Raise WarmupError unless the members' values for the head are (rows, members, k), finite,
    and probabilities where the task says so (classification's rows summing to one)."""
    k = head.columns
    if values.shape != (rows, members, k):
        raise WarmupError(f"{what} of head {head.name!r} have shape {list(values.shape)}, expected "
                          f"[{rows}, {members}, {k}]")
    if not np.all(np.isfinite(values)):
        raise WarmupError(f"{what} of head {head.name!r} are not finite (NaN or infinity)")
    if head.task != "regression" and (values.min() < -1e-3 or values.max() > 1 + 1e-3):
        raise WarmupError(f"{what} of {head.task} head {head.name!r} are not probabilities (outside [0, 1]); "
                          "end it with a softmax or a sigmoid, or declare the head a regression")
    if head.task == "classification":
        sums = values.sum(axis=-1)
        if np.abs(sums - 1).max() > 1e-3:
            raise WarmupError(f"{what} of classification head {head.name!r} do not sum to 1 (end it with a softmax)")


def warm_up_named(ensemble: Ensemble, warmup_sizes: Sequence[int], pace: Callable[[], None] = no_pause) -> Ensemble:
    """Run each batch size once and check every head's outputs; raises WarmupError otherwise."""
    manifest = ensemble.manifest
    for rows in sorted(set(warmup_sizes)):
        try:
            outputs = ensemble.engine.run(warmup_inputs(manifest.inputs, rows))
        except Exception as exc:  # a member that fails on a valid batch is a broken version
            raise WarmupError(f"warm-up on {rows} rows failed: {exc}") from None
        outputs = list(outputs)
        for head in manifest.heads:
            check_head(head, outputs.pop(0), rows, len(manifest.members), "the members' values")
            if head.variance:
                variances = outputs.pop(0)
                check_head(head, variances, rows, len(manifest.members), "the members' variances")
                if variances.min() < 0:
                    raise WarmupError(f"the members' variances of head {head.name!r} are negative")
        pace()
    return ensemble
