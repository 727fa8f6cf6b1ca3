"""What an ensemble answers, as numbers: the pooled and calibrated distribution, and the three
uncertainty scores of each row. Part of the repository contract (like `repository`): the trainer
fits a temperature and an abstention threshold in these terms, the manifest stores them, and
the service computes the same quantities, so a threshold means the same thing on both sides.

Pure NumPy, vectorised over rows; no TensorFlow, no HTTP.

- **Pool, then calibrate.** The served distribution is the members' weighted mean, tempered in
  log space: softmax(log(max(mean, LOG_FLOOR)) / T). The floor keeps a probability of 0 finite
  (its log would be minus infinity); T > 0 keeps every row's argmax. T = 1 is the plain mean.
- **Uncertainty** (natural log, per row):
  - `entropy`: of the served (calibrated) distribution, the total uncertainty;
  - `expected_entropy`: the members' entropies, averaged with the ensemble's weights, the
    uncertainty each member has on its own (aleatoric);
  - `mutual_information`: the entropy of the members' (uncalibrated) mean minus
    `expected_entropy`, the members' disagreement as information (epistemic; the weighted
    Jensen-Shannon divergence of the members, never negative). With T = 1,
    entropy = expected_entropy + mutual_information exactly; with calibration the total is the
    calibrated distribution's, while the split into its two parts stays the members' own (a
    temperature applied after pooling changes no member, and a split taken on the tempered
    total could go negative).
"""

from __future__ import annotations

from typing import Sequence, get_args

import numpy as np

from contract.manifest import ScoreName

# Probabilities are floored here before their log: small enough not to move any probability a
# float32 softmax produces by more than rounding, large enough that log(floor) / T stays finite.
LOG_FLOOR = 1e-12
SCORES: tuple[str, ...] = get_args(ScoreName)


def pool(member_probs: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted mean over members: (rows, members, classes) -> (rows, classes)."""
    return np.einsum("rmk,m->rk", member_probs, np.asarray(weights, dtype=member_probs.dtype))


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(max(probs, LOG_FLOOR)) / temperature) row by row; `probs` itself when
    temperature is 1."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.maximum(probs, LOG_FLOOR)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def served(member_probs: np.ndarray, weights: Sequence[float], temperature: float) -> np.ndarray:
    """What the ensemble answers for the members' probabilities (rows, members, classes): their
    weighted mean, tempered."""
    return temper(pool(member_probs, weights), temperature)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats over the last axis (0 log 0 counts as 0)."""
    return -np.sum(probs * np.log(np.maximum(probs, LOG_FLOOR)), axis=-1)


def uncertainty(served: np.ndarray, member_probs: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """(rows, 3): entropy, expected_entropy, mutual_information of each row (see the module's
    docstring), from the served probabilities (rows, classes) and the members' (rows, members,
    classes)."""
    w = np.asarray(weights, dtype=np.float64)
    members = member_probs.astype(np.float64, copy=False)
    expected = entropy(members) @ w
    out = np.empty((len(served), 3))
    out[:, 0] = entropy(served.astype(np.float64, copy=False))
    out[:, 1] = expected
    # The mean's entropy is at least the members' mean entropy (concavity); rounding may not be.
    out[:, 2] = np.maximum(entropy(pool(members, w)) - expected, 0.0)
    return out


def abstains(scores: np.ndarray, score: str, threshold: float) -> np.ndarray:
    """Per row: whether its `score` (a column of `uncertainty`) is above the threshold."""
    return scores[:, SCORES.index(score)] > threshold
