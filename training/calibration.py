"""Pool, then calibrate: one temperature applied to the ensemble's averaged distribution, fitted
on the validation split by minimising its negative log-likelihood.

Averaging members that are each well calibrated makes the mean under-confident (their mistakes
differ, so the mean spreads its mass), and calibrating each member before averaging does not
undo that; one temperature after the average does (Rahaman & Thiery, "Uncertainty
Quantification and Deep Ensembles", NeurIPS 2021). The temperature works in log space
(`contract.scores.temper`), so a probability of 0 stays finite, and T > 0 keeps every argmax.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from contract.scores import LOG_FLOOR
from training.task_metrics import gaussian_nll

# The search range of T: far beyond any temperature a sane ensemble needs either way.
T_MIN, T_MAX = 0.05, 20.0
# A weak normal prior on log T (standard deviation 0.5: T within about 0.37-2.7 beforehand).
# Without it, a validation split the pool gets entirely right is fitted best by T -> 0, an
# ensemble certain of everything; with it, such a split moves T only as far as its rows justify.
LOG_T_PRIOR_SD = 0.5
# A regression head's variance scale (contract.tasks.regression): its search range, and a weak
# normal prior on log s, wider than T's (s within about 0.14-7.4 beforehand): a means-only
# head's spread of means can be far from its error's variance.
S_MIN, S_MAX = 1e-3, 1e3
LOG_S_PRIOR_SD = 1.0


def tempered_losses(probs: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """Per row: -log of the label's probability after tempering (computed in log space)."""
    logits = np.log(np.maximum(np.asarray(probs, dtype=np.float64), LOG_FLOOR)) / temperature
    return logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels]


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [T_MIN, T_MAX] minimising the mean negative log-likelihood of the
    tempered probabilities (rows, classes) on these labels, under the weak prior on log T (the
    maximum a posteriori temperature)."""
    if len(labels) == 0:
        return 1.0
    penalty = 1.0 / (2 * LOG_T_PRIOR_SD ** 2 * len(labels))  # the prior's share of a mean loss

    def loss(log_t: float) -> float:
        return float(np.mean(tempered_losses(probs, labels, np.exp(log_t)))) + penalty * log_t ** 2

    result = minimize_scalar(loss,
                             bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def _prior(rows: int, sd: float) -> float:
    """A weak normal prior's share of a mean loss, per squared log unit."""
    return 1.0 / (2 * sd ** 2 * max(rows, 1))


def fit_label_temperatures(p: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Per label, the temperature in [T_MIN, T_MAX] minimising the mean Bernoulli NLL of
    sigmoid(logit(p) / T) (contract.tasks.calibrate_labels) under fit_temperature's weak prior."""
    if len(p) == 0:
        return (1.0,) * p.shape[1]
    clipped = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)  # as contract.tasks clips
    signed = (np.log(clipped) - np.log1p(-clipped)) * (2 * y - 1)  # the logit toward what happened
    penalty = _prior(len(p), LOG_T_PRIOR_SD)
    out = []
    for j in range(p.shape[1]):
        def loss(log_t: float, z: np.ndarray = signed[:, j]) -> float:
            return float(np.mean(np.logaddexp(0.0, -z / np.exp(log_t)))) + penalty * log_t ** 2
        result = minimize_scalar(loss, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                                 options={"xatol": 1e-4})
        out.append(float(np.exp(result.x)))
    return tuple(out)


def fit_variance_scale(mean: np.ndarray, variance: np.ndarray, target: np.ndarray, floor: np.ndarray) -> float:
    """The scale s in [S_MIN, S_MAX] minimising the mean (over rows) Gaussian NLL of N(mean,
    s × variance), summed over targets, under a weak normal prior on log s (LOG_S_PRIOR_SD)."""
    if len(mean) == 0:
        return 1.0
    penalty = _prior(len(mean), LOG_S_PRIOR_SD)

    def loss(log_s: float) -> float:
        nll = gaussian_nll(mean, np.exp(log_s) * variance, target, floor).sum(axis=1)
        return float(nll.mean()) + penalty * log_s ** 2

    result = minimize_scalar(loss, bounds=(np.log(S_MIN), np.log(S_MAX)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))
