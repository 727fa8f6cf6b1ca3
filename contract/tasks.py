"""The combination rule of each task: how the members' outputs for one head become the
ensemble's value, how that value is calibrated, and what uncertainty each row carries. Part of
the repository contract (like `scores`, which holds classification's rule): the trainer fits a
head's calibration and abstention in these terms, the manifest stores them, and the service
applies the same rule, so a fitted number means the same thing on both sides.

Pure NumPy, vectorised over rows; no TensorFlow, no HTTP. Members' outputs are (rows, members,
k) arrays; weights are the manifest's, summing to one.

- `classification`: softmax rows over k classes. The weighted mean, tempered in log space
  (contract.scores); per row: entropy, expected_entropy, mutual_information.
- `binary` and `multilabel`: k independent probabilities of "yes" (binary: k = 1), each
  member's sigmoid. The weighted mean per label, calibrated by a temperature on its logit
  (sigmoid(logit(p) / T), one T per label, Platt scaling without a shift); per row and label
  the same three scores over the label's two outcomes.
- `regression`: k numbers. Each member gives a mean and, with a Gaussian head, a variance
  (Lakshminarayanan et al. 2017). The ensemble is their mixture: the weighted mean of the
  means; its variance the weighted mean of the members' variances (aleatoric) plus the
  weighted spread of their means (epistemic), times a variance scale fitted on validation (its
  calibration). Per row and target: std, epistemic_std, aleatoric_std; an interval at any level
  is the mean plus or minus the normal quantile times std.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

from contract.manifest import TASK_SCORES, TASKS, HeadSpec
from contract.scores import LOG_FLOOR, pool, temper, uncertainty

# The score each task's abstention and drift alert read by default.
EPISTEMIC = {"classification": "mutual_information", "binary": "mutual_information",
             "multilabel": "mutual_information", "regression": "epistemic_std"}
_PROBABILITY_CLIP = 1e-7  # a logit of 0 or 1 is infinite: probabilities are clipped this far in


@dataclass(frozen=True, eq=False)
class Combined:
    """The ensemble's answer for one head: `value` (rows, k), the classes' probabilities, the
    labels' probabilities of "yes" or the targets' means; `variance` (rows, k) for regression,
    else None; `scores` {name: (rows,) for classification, (rows, k) otherwise}."""

    value: np.ndarray
    variance: np.ndarray | None
    scores: dict[str, np.ndarray]


def combine(task: str, members: np.ndarray, weights: Sequence[float], calibration: Sequence[float] | float = 1.0,
            variances: np.ndarray | None = None) -> Combined:
    """The head's combined answer for the members' outputs (rows, members, k) under the task's
    rule; `calibration` is the temperature (classification), the temperature of each label (binary,
    multilabel; one number for all) or the variance scale (regression); `variances` the members'
    variances (rows, members, k) of a Gaussian regression head."""
    if task == "classification":
        return classification(members, weights, float(np.asarray(calibration).reshape(-1)[0]))
    if task in ("binary", "multilabel"):
        return labels(members, weights, calibration)
    if task == "regression":
        return regression(members, weights, float(np.asarray(calibration).reshape(-1)[0]), variances)
    raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")


def classification(members: np.ndarray, weights: Sequence[float], temperature: float = 1.0) -> Combined:
    """Softmax rows: the weighted mean, tempered; entropy, expected_entropy, mutual_information."""
    value = temper(pool(members, weights), temperature)
    scores = uncertainty(value, members, weights)
    return Combined(value, None, dict(zip(TASK_SCORES["classification"], scores.T)))


def calibration_of(head: HeadSpec) -> Sequence[float] | float:
    """What a head's manifest entry gives `combine` as its calibration: the variance scale of a
    regression head, else its temperatures (1 when it has none: not calibrated)."""
    return head.variance_scale if head.task == "regression" else (head.temperatures or 1.0)


def combine_head(head: HeadSpec, outputs: np.ndarray, weights: Sequence[float]) -> Combined:
    """The head's answer to its members' outputs (rows, members, c) as the members emit them (a
    Gaussian regression head: its k means, then its k variances), calibrated as the manifest says."""
    k = head.columns
    return combine(head.task, outputs[:, :, :k], weights, calibration_of(head),
                   outputs[:, :, k:2 * k] if head.variance else None)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of a yes/no outcome of probability p (elementwise; 0 log 0 counts as 0)."""
    q = 1.0 - p
    return -(p * np.log(np.maximum(p, LOG_FLOOR)) + q * np.log(np.maximum(q, LOG_FLOOR)))


def calibrate_labels(p: np.ndarray, temperatures: Sequence[float] | float) -> np.ndarray:
    """sigmoid(logit(p) / T) per label (T broadcast over the last axis); p itself where T is 1."""
    t = np.asarray(temperatures, dtype=np.float64)
    if np.all(t == 1.0):
        return p
    clipped = np.clip(p.astype(np.float64), _PROBABILITY_CLIP, 1 - _PROBABILITY_CLIP)
    logits = np.log(clipped) - np.log1p(-clipped)
    return (1.0 / (1.0 + np.exp(-logits / t))).astype(p.dtype)


def labels(members: np.ndarray, weights: Sequence[float], temperatures: Sequence[float] | float = 1.0) -> Combined:
    """Independent yes/no labels (binary: one): the weighted mean per label, calibrated; per
    label the entropy of the calibrated probability, the members' weighted mean entropy, and
    their mutual information (never negative)."""
    w = np.asarray(weights, dtype=np.float64)
    mean = pool(members, weights)
    value = calibrate_labels(mean, temperatures)
    per_member = binary_entropy(members.astype(np.float64, copy=False))  # (rows, members, k)
    expected = np.einsum("rmk,m->rk", per_member, w)
    mutual = np.maximum(binary_entropy(mean.astype(np.float64, copy=False)) - expected, 0.0)
    total = binary_entropy(value.astype(np.float64, copy=False))
    return Combined(value, None, dict(zip(TASK_SCORES["binary"], (total, expected, mutual))))


def regression(means: np.ndarray, weights: Sequence[float], variance_scale: float = 1.0,
               variances: np.ndarray | None = None) -> Combined:
    """The members' Gaussian mixture: weighted mean of the means; variance = scale x (weighted
    mean of the variances + weighted spread of the means); std, epistemic_std, aleatoric_std."""
    w = np.asarray(weights, dtype=np.float64)
    mu_m = means.astype(np.float64, copy=False)
    mean = np.einsum("rmk,m->rk", mu_m, w)
    epistemic = np.einsum("rmk,m->rk", (mu_m - mean[:, None, :]) ** 2, w)
    aleatoric = (np.einsum("rmk,m->rk", np.maximum(variances.astype(np.float64, copy=False), 0.0), w)
                 if variances is not None else np.zeros_like(mean))
    epistemic, aleatoric = variance_scale * epistemic, variance_scale * aleatoric
    variance = epistemic + aleatoric
    scores = {"std": np.sqrt(variance), "epistemic_std": np.sqrt(epistemic), "aleatoric_std": np.sqrt(aleatoric)}
    return Combined(mean.astype(means.dtype), variance, scores)


def predicted_columns(task: str, value: np.ndarray) -> np.ndarray | None:
    """What a head predicts for each row, as a (rows, labels) 0/1 array: the top class
    (classification), the negative or the positive label at probability 0.5 (binary: two
    columns from its one), every label at 0.5 or more (multi-label); None for regression, which
    predicts numbers."""
    if task == "classification":
        return np.eye(value.shape[1], dtype=np.int64)[value.argmax(axis=1)]
    if task == "binary":
        yes = (value[:, 0] >= 0.5).astype(np.int64)
        return np.stack([1 - yes, yes], axis=1)
    if task == "multilabel":
        return (value >= 0.5).astype(np.int64)
    return None


def predicted_labels(task: str, labels: Sequence[str], value: np.ndarray) -> list | None:
    """Each row's prediction by name: a label (classification, binary), the list of labels
    (multi-label); None for regression."""
    chosen = predicted_columns(task, value)
    if chosen is None:
        return None
    if task == "multilabel":
        return [[label for label, on in zip(labels, row) if on] for row in chosen.tolist()]
    return [labels[i] for i in chosen.argmax(axis=1).tolist()]


def z_of(level: float) -> float:
    """The normal quantile of a central interval at `level` (0.9 -> 1.645)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"an interval's level must be between 0 and 1 (exclusive), got {level}")
    return NormalDist().inv_cdf((1.0 + level) / 2.0)


def interval(combined: Combined, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) (rows, k) of a regression answer's central interval at `level`."""
    if combined.variance is None:
        raise ValueError("only a regression answer has intervals")
    half = z_of(level) * np.sqrt(combined.variance)
    return combined.value - half, combined.value + half
