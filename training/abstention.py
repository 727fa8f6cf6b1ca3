"""When to say "I do not know": an uncertainty threshold fitted on the validation split, and how
well each uncertainty score tells wrong answers (or unseen classes) from right ones.

A row is answered when its score is at most the threshold and abstained on otherwise. The
threshold is the largest that keeps the error rate of the answered validation rows at or under
the target (`--target-error`); the score used is the one that answers the most validation rows
at that target (ties: the better AUROC for telling wrong answers from right ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from contract.scores import SCORES


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive row scores above a negative one (ties count half): the area
    under the ROC curve, from ranks. NaN when either kind is missing."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, coverage, risk): answering rows with score <= each distinct threshold, the
    share of rows answered and the error rate among them, from the most certain rows up."""
    order = np.argsort(scores, kind="stable")
    s, wrong = np.asarray(scores)[order], ~np.asarray(correct, dtype=bool)[order]
    last = np.r_[s[1:] != s[:-1], True]  # a threshold answers every row of a tie, or none
    answered = np.arange(1, len(s) + 1)[last]
    errors = np.cumsum(wrong)[last]
    return s[last], answered / len(s), errors / answered


@dataclass(frozen=True)
class Threshold:
    score: str
    threshold: float
    target_error: float
    coverage: float  # on the rows it was fitted on
    risk: float


def fit_threshold(scores: np.ndarray, correct: np.ndarray, target_error: float) -> tuple[float, float, float]:
    """(threshold, coverage, risk): the largest threshold whose answered rows err at most
    `target_error`. When not even the most certain rows meet it, the threshold is below every
    score (-1: scores are never negative) and nothing is answered."""
    thresholds, coverage, risk = risk_coverage(scores, correct)
    ok = np.flatnonzero(risk <= target_error + 1e-12)
    if len(ok) == 0:
        return -1.0, 0.0, 0.0
    i = ok[-1]
    return float(thresholds[i]), float(coverage[i]), float(risk[i])


def choose_threshold(scores: np.ndarray, correct: np.ndarray, target_error: float) -> Threshold:
    """Among the columns of `scores` (rows, len(SCORES)), the one answering the most rows at
    the target, and its threshold."""
    best: tuple | None = None
    for j, name in enumerate(SCORES):
        threshold, coverage, risk = fit_threshold(scores[:, j], correct, target_error)
        key = (coverage, auroc(scores[:, j], ~correct) if (~correct).any() else 0.0)
        if best is None or key > best[0]:
            best = (key, Threshold(name, threshold, target_error, coverage, risk))
    return best[1]


def apply_threshold(scores: np.ndarray, correct: np.ndarray, chosen: Threshold) -> tuple[float, float]:
    """(coverage, risk) of the threshold on other rows (the test split)."""
    answered = scores[:, SCORES.index(chosen.score)] <= chosen.threshold
    coverage = float(answered.mean()) if len(answered) else 0.0
    risk = float((~correct[answered]).mean()) if answered.any() else 0.0
    return coverage, risk


def fit_rms_threshold(scores: np.ndarray, losses: np.ndarray, target: float) -> tuple[float, float, float]:
    """(threshold, coverage, risk) for a loss rather than a right-or-wrong: the largest threshold
    whose answered rows (score at most it) have a root mean loss at most `target`; (-1, 0, 0)
    when not even the most certain rows do (a regression head's interval width and squared error)."""
    order = np.argsort(scores, kind="stable")
    s, cumulative = np.asarray(scores)[order], np.cumsum(np.asarray(losses)[order])
    last = np.r_[s[1:] != s[:-1], True]  # a threshold answers every row of a tie, or none
    answered = np.arange(1, len(s) + 1)[last]
    risk = np.sqrt(cumulative[last] / answered)
    ok = np.flatnonzero(risk <= target + 1e-12)
    if len(ok) == 0:
        return -1.0, 0.0, 0.0
    i = ok[-1]
    return float(s[last][i]), float(answered[i] / len(s)), float(risk[i])
