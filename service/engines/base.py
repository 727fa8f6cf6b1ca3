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
from contract.manifest import InputSpec, Manifest, RepositoryError
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

