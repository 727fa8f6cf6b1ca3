"""A servable version: what the manager holds and the batcher calls, with no TensorFlow in it.

An `Ensemble` is a version's manifest and one function, rows in, (averaged probabilities,
per-member probabilities) out, computed by one of two engines: TensorFlow Lite
(`service.lite`, the default) or TensorFlow (`service.frozen`). The server imports TensorFlow
only for a version that needs it, so a server whose versions all run on TensorFlow Lite holds
no TensorFlow at all (~100 MB resident instead of ~650). The checks every version passes before
it goes live (`warm_up`) live here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from service.errors import InferenceFailed
from service.repository import InputSpec, Manifest, RepositoryError

log = logging.getLogger(__name__)

# A probability row must sum to one within this (float32 softmax and averaging round a little).
ROW_SUM_TOLERANCE = 1e-3
_WARMUP_SEED = 20240601


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
    rng = np.random.default_rng(_WARMUP_SEED)
    return rng.uniform(0.0, 1.0, size=(rows, *spec.shape)).astype(spec.dtype)


@dataclass(eq=False)
class Ensemble:
    """A loaded, verified, warmed version: call `predict` from any thread."""

    manifest: Manifest
    path: Path
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # rows -> (average, stacked members)
    engine: str = "tensorflow"  # what `run` computes with: "tflite" or "tensorflow"
    fn: object = None  # the version's TensorFlow concrete function, where this process built one
    owner: object = None  # keeps alive what `fn` reads (the Keras model's variables), if anything

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
        average, members = self.run(x)
        if len(average) != len(x) or len(members) != len(x):
            raise InferenceFailed(
                f"{self.name} version {self.version} returned {len(average)} rows for {len(x)} inputs"
            )
        return average, members


def _no_pause() -> None:
    return None


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
