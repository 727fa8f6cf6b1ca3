"""Metrics of members and of their average, as pure functions of probabilities and labels."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Probabilities are clipped before the log so a confident mistake costs a large, finite loss.
_EPS = 1e-7
ECE_BINS = 15


def average_probabilities(member_probs: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted mean over members of probability rows: (members, rows, classes) -> (rows, classes)."""
    member_probs = np.asarray(member_probs, dtype="float64")
    w = np.asarray(weights, dtype="float64")
    if member_probs.ndim != 3 or member_probs.shape[0] != len(w):
        raise ValueError(
            f"expected probabilities of shape (members={len(w)}, rows, classes), got {member_probs.shape}"
        )
    if np.any(w < 0) or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"weights must be non-negative and sum to 1, got {w.tolist()}")
    return np.tensordot(w, member_probs, axes=1)


def correct_per_row(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1.0 where the row's most probable class is the label, else 0.0."""
    return (np.argmax(probs, axis=1) == labels).astype(np.float64)


def nll_per_row(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log p(label) of each row, p clipped at _EPS."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], _EPS, 1.0))


def brier_per_row(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Squared distance between each probability row and its one-hot label."""
    onehot = np.zeros_like(probs, dtype="float64")
    onehot[np.arange(len(labels)), labels] = 1.0
    return np.sum((probs - onehot) ** 2, axis=1)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose most probable class is the label."""
    return float(np.mean(correct_per_row(probs, labels)))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean of -log p(label): the log-loss."""
    return float(np.mean(nll_per_row(probs, labels)))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over rows of the squared distance between the probability row and the one-hot label."""
    return float(np.mean(brier_per_row(probs, labels)))


# The metrics that are means over rows, by their per-row values (ECE is not: it bins the rows).
PER_ROW = {"accuracy": correct_per_row, "nll": nll_per_row, "brier": brier_per_row}


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width confidence bin: (mean confidence, accuracy, rows), NaN where a bin is empty.

    Bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur with softmax.
    """
    confidence = np.max(probs, axis=1)
    correct = np.argmax(probs, axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        bin_accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins) / counts
    return mean_confidence, bin_accuracy, counts


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Row-weighted gap between confidence and accuracy over equal-width confidence bins."""
    mean_confidence, bin_accuracy, counts = reliability_bins(probs, labels, bins)
    filled = counts > 0
    gaps = np.abs(mean_confidence[filled] - bin_accuracy[filled])
    return float(np.sum(counts[filled] * gaps) / counts.sum())


METRICS = ("accuracy", "nll", "brier", "ece")
HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "brier": False, "ece": False}


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """All four metrics of one probability matrix against integer labels."""
    probs = np.asarray(probs, dtype="float64")
    labels = np.asarray(labels)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"expected (rows, classes) probabilities for {len(labels)} labels, got {probs.shape}")
    return {
        "accuracy": accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": expected_calibration_error(probs, labels),
    }


def format_table(rows: dict[str, dict[str, float]], metrics: Sequence[str] = METRICS) -> str:
    """A plain-text table: one row per member and the ensemble, one column per metric."""
    width = max(len("member"), *(len(k) for k in rows))
    columns = [max(8, len(m)) for m in metrics]  # a name longer than a figure widens its column
    lines = [f"{'member':<{width}}  " + "  ".join(f"{m:>{c}}" for m, c in zip(metrics, columns))]
    for name, values in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{values[m]:>{c}.4f}" for m, c in zip(metrics, columns)))
    return "\n".join(lines)
