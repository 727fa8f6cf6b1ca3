"""Averaging weights fitted on the validation split: the convex combination of members that
minimises the ensemble's negative log-likelihood there. The test split is never used here."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from training.evaluate import average_probabilities, negative_log_likelihood

# Weights below this share are folded back into the others: a member the fit all but
# ignores still costs a full forward pass at serving time, and the manifest requires w > 0.
MIN_WEIGHT = 1e-3


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def fit_weights(member_probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """Weights on the simplex minimising NLL of the weighted average (members, rows, classes)."""
    m = member_probs.shape[0]
    if m == 1:
        return [1.0]

    def loss(z: np.ndarray) -> float:
        return negative_log_likelihood(average_probabilities(member_probs, _softmax(z)), labels)

    result = minimize(loss, np.zeros(m), method="L-BFGS-B")
    return floor_and_normalise(_softmax(result.x))


def floor_and_normalise(weights: np.ndarray, floor: float = MIN_WEIGHT) -> list[float]:
    """Raise every weight to at least `floor`, then rescale so they sum to exactly one."""
    w = np.maximum(np.asarray(weights, dtype="float64"), floor)
    w = w / w.sum()
    w[-1] = 1.0 - w[:-1].sum()  # absorb rounding so the manifest's sum check holds exactly
    return [float(v) for v in w]
