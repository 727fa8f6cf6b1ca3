"""Which members the ensemble keeps, with which weights, and its temperature: all decided on the
validation split, never on the test rows.

Three ways (`--weights`):

- `pruned` (the default): start from every member with equal weights and drop, one at a time,
  the member whose removal lowers the calibrated ensemble's validation NLL the most, as long as
  the evidence says it does: the paired bootstrap 95% interval of the change in per-row NLL
  lies entirely below zero. A member much worse than the rest goes; members that differ within
  the noise of the validation rows stay. Weights stay equal among the kept.
- `fitted`: the convex weights that minimise the averaged members' validation NLL
  (`training.weighting`), then the temperature on that weighted average (in sequence, not
  jointly: the weights say how to mix, the temperature only how sharp the mix is).
- `uniform`: every member, equal weights.

Each way ends with one temperature fitted on the validation split (`training.calibration`)
when calibration is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np

from contract.manifest import uniform_weights
from contract.scores import pool
from training.calibration import fit_temperature, tempered_losses
from training.compare import bootstrap_means
from training.weighting import fit_weights

RESAMPLES = 1000
Weighting = Literal["pruned", "fitted", "uniform"]
WEIGHTINGS = ("pruned", "fitted", "uniform")


@dataclass(frozen=True)
class Removal:
    """One member dropped, and the evidence: the mean change of validation NLL per row when it
    goes (negative: better without it) with its 95% bootstrap interval."""

    member: str
    change: float
    low: float
    high: float


@dataclass(frozen=True)
class Selection:
    kept: list[int]
    weights: list[float]
    temperature: float
    removed: list[Removal] = field(default_factory=list)


def _calibrated_losses(val_probs: np.ndarray, labels: np.ndarray, members: list[int],
                       weights: list[float], calibrate: bool) -> np.ndarray:
    mixed = pool(np.moveaxis(val_probs[members], 0, 1), weights)
    t = fit_temperature(mixed, labels) if calibrate else 1.0
    return tempered_losses(mixed, labels, t)


def _removal(name: str, change: np.ndarray, seed: int, resamples: int) -> Removal | None:
    """The evidence for leaving a member out, or None when its interval does not lie below zero."""
    low, high = np.percentile(bootstrap_means(change, resamples, seed), [2.5, 97.5])
    return Removal(name, float(change.mean()), float(low), float(high)) if high < 0 else None


def prune_by(names: Sequence[str], losses: Callable[[list[int]], np.ndarray], min_members: int = 1,
             seed: int = 0, resamples: int = RESAMPLES) -> tuple[list[int], list[Removal]]:
    """(indices of the members kept, the removals with their evidence) under the module
    docstring's rule, for any per-row validation loss of a set of members (`losses(kept)`),
    never leaving fewer than `min_members`."""
    kept: list[int] = list(range(len(names)))
    removed: list[Removal] = []
    while len(kept) > max(min_members, 1):
        current = losses(kept)
        found = [r for m in kept
                 if (r := _removal(names[m], losses([k for k in kept if k != m]) - current, seed, resamples))]
        if not found:
            break
        best = min(found, key=lambda r: r.change)  # ties: the first found
        removed.append(best)
        kept.remove(list(names).index(best.member))
    return kept, removed


def prune(names: list[str], val_probs: np.ndarray, labels: np.ndarray, calibrate: bool = True,
          seed: int = 0, resamples: int = RESAMPLES, min_members: int = 1) -> tuple[list[int], list[Removal]]:
    """`prune_by` on the calibrated ensemble's validation NLL of softmax members' probabilities."""
    return prune_by(names, lambda kept: _calibrated_losses(val_probs, labels, kept, uniform_weights(len(kept)),
                                                           calibrate), min_members, seed, resamples)


def select(names: list[str], val_probs: np.ndarray, labels: np.ndarray, weighting: Weighting,
           calibrate: bool = True, seed: int = 0, min_members: int = 1) -> Selection:
    """Members kept, their weights and the temperature, from the members' validation
    probabilities (members, rows, classes)."""
    if weighting == "pruned":
        kept, removed = prune(names, val_probs, labels, calibrate, seed, min_members=min_members)
        weights = uniform_weights(len(kept))
    elif weighting == "fitted":
        kept, removed = list(range(len(names))), []
        weights = fit_weights(val_probs, labels)
    elif weighting == "uniform":
        kept, removed = list(range(len(names))), []
        weights = uniform_weights(len(names))
    else:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    mixed = pool(np.moveaxis(val_probs[kept], 0, 1), weights)
    temperature = fit_temperature(mixed, labels) if calibrate else 1.0
    return Selection(kept, weights, temperature, removed)
