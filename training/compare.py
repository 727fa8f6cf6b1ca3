"""An honest comparison: the ensemble against the member a user would have deployed instead.

That member is chosen on the validation split (lowest NLL there), never on the test rows: the
member that is best on the test rows themselves flatters the members. The two are then compared
on the test split, and each difference comes with a paired bootstrap 95% interval (the same
resampled rows for both), so a few hundred test rows are read for what they can and cannot show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.evaluate import HIGHER_IS_BETTER, METRICS, PER_ROW, expected_calibration_error, negative_log_likelihood

RESAMPLES = 1000
# Resamples drawn at a time: the indices of a resample are as many as the rows, so all 1,000 at
# once would hold 8,000 bytes a row (800 MB for 100,000 test rows).
_CHUNK = 50


def resamples_of(rows: int, resamples: int, seed: int):
    """Bootstrap resamples of `rows` row indices, (at most _CHUNK, rows) arrays at a time; the
    same seed gives the same resamples."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _CHUNK):
        yield rng.integers(0, rows, size=(min(_CHUNK, resamples - start), rows))


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """The mean of `values` (one per row) over each bootstrap resample of the rows."""
    return np.concatenate([values[picks].mean(axis=1) for picks in resamples_of(len(values), resamples, seed)])


def select_member(names: list[str], val_probs: np.ndarray, val_labels: np.ndarray) -> str:
    """The member with the lowest validation NLL (ties: the first): the one a user would deploy."""
    losses = [negative_log_likelihood(p, val_labels) for p in val_probs]
    return names[int(np.argmin(losses))]


@dataclass(frozen=True)
class Difference:
    """One metric of the ensemble and of the member on the same rows, and the ensemble minus
    the member with its 95% bootstrap interval."""

    metric: str
    ensemble: float
    member: float
    difference: float
    low: float
    high: float

    @property
    def better(self) -> bool:
        """The ensemble is better on these rows (in the metric's own direction)."""
        return self.difference > 0 if HIGHER_IS_BETTER[self.metric] else self.difference < 0

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def sentence(self) -> str:
        verdict = ("better" if self.better else "worse" if self.difference != 0 else "equal")
        sure = "the interval excludes 0" if self.significant else "the interval includes 0"
        return (f"{self.metric}: ensemble {self.ensemble:.4f} vs {self.member:.4f}, difference "
                f"{self.difference:+.4f} [{self.low:+.4f}, {self.high:+.4f}]: {verdict} ({sure})")


def compare(ensemble: np.ndarray, member: np.ndarray, labels: np.ndarray, seed: int = 0,
            resamples: int = RESAMPLES) -> dict[str, Difference]:
    """Every metric of the two probability matrices on `labels`, with paired bootstrap intervals."""
    labels = np.asarray(labels)
    ensemble, member = np.asarray(ensemble, np.float64), np.asarray(member, np.float64)
    out = {}
    for metric in METRICS:
        if metric in PER_ROW:
            a, b = PER_ROW[metric](ensemble, labels), PER_ROW[metric](member, labels)
            point = float(a.mean() - b.mean())
            draws = bootstrap_means(a - b, resamples, seed)  # paired: the same rows for both
            values = float(a.mean()), float(b.mean())
        else:  # ECE is not a mean over rows: computed on each resample
            values = (expected_calibration_error(ensemble, labels), expected_calibration_error(member, labels))
            point = values[0] - values[1]
            draws = np.array([expected_calibration_error(ensemble[i], labels[i])
                              - expected_calibration_error(member[i], labels[i])
                              for picks in resamples_of(len(labels), resamples, seed) for i in picks])
        low, high = np.percentile(draws, [2.5, 97.5])
        out[metric] = Difference(metric, values[0], values[1], point, float(low), float(high))
    return out
