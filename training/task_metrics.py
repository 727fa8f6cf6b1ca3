"""The metrics of one head of any task (contract.tasks), as pure functions of what the head
answers on some rows and the rows' targets, and the paired bootstrap comparison of two answers.

A head's answer is its `value` (rows, k) (the classes' or the labels' probabilities, or the
targets' means) and, for regression, its `variance` (rows, k). Classification is measured and
compared exactly as format 1 is (`training.evaluate`, `training.compare`), so a classification
head's figures equal the format-1 assessment's. The other tasks:

- `binary` and `multilabel` (each label a yes/no outcome, predicted yes at probability 0.5 as
  `contract.tasks.predicted_columns` says): `nll`, the Bernoulli NLL summed over labels and
  averaged over rows (the per-row NLL the selection and calibration minimise); `brier`, the
  squared error of the probability averaged over rows and labels; `ece`, per label over 15
  equal-width bins of the probability of yes against the frequency of yes, averaged over labels;
  `accuracy`, the share of rows with every label right (binary: the row's one label; multi-label:
  exact match); binary `f1` of the positive label; multi-label `hamming_loss`, `micro_f1`,
  `macro_f1` (a label with no positive rows and no positive predictions has F1 0, as
  scikit-learn's default says), and `nll_label_<j>`, each label's mean NLL.
- `regression`: `rmse` and `r2` per target, then averaged over targets (`r2` as scikit-learn's
  `r2_score`, a constant target giving 1 when predicted exactly, else 0); `mae` over rows and
  targets; `nll`, the Gaussian NLL of the served normal (mean, variance) summed over targets;
  and at each of LEVELS the share of targets inside the central interval
  (`contract.tasks.interval`), `coverage_50`, and its mean width, `width_50`. A member without
  a variance output has no distribution of its own: its nll, coverages and widths are NaN.

The NLL of a regression answer floors the variance at `floor` (k,) (see
`training.head_assess.variance_floor`): where members agree exactly, a means-only head serves a
variance of 0, and its NLL would be infinite. The floor keeps the figure finite and large; the
served values and intervals (coverage, width) are never floored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from contract import tasks
from training.compare import RESAMPLES, Difference, bootstrap_means, compare, resamples_of
from training.evaluate import ECE_BINS, METRICS, classification_metrics

LEVELS = (0.5, 0.9, 0.95)  # the central intervals a regression head is measured at
LABEL_EPS = 1e-7  # probabilities are clipped this far from 0 and 1 before the log (as training.evaluate)

# The headline metrics of each task, in the order they are tabled and compared.
HEADLINE = {
    "classification": METRICS,
    "binary": ("accuracy", "f1", "nll", "brier", "ece"),
    "multilabel": ("accuracy", "hamming_loss", "micro_f1", "macro_f1", "nll", "brier", "ece"),
    "regression": ("rmse", "mae", "r2", "nll",
                   *(f"{kind}_{round(level * 100)}" for level in LEVELS for kind in ("coverage", "width"))),
}
# Coverage counts as higher-is-better (an interval covering less than its level is the usual
# failure of an ensemble) and width as lower-is-better; neither alone says an interval is good,
# so a gate reads them together, never one on its own.
HIGHER_IS_BETTER = {
    "accuracy": True, "nll": False, "brier": False, "ece": False, "f1": True, "micro_f1": True,
    "macro_f1": True, "hamming_loss": False, "rmse": False, "mae": False, "r2": True,
    **{f"coverage_{round(level * 100)}": True for level in LEVELS},
    **{f"width_{round(level * 100)}": False for level in LEVELS},
}
PER_LABEL_NLL = "nll_label_"  # prefix of a multi-label head's per-label NLL


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better (every name `head_metrics` emits)."""
    return False if metric.startswith(PER_LABEL_NLL) else HIGHER_IS_BETTER[metric]


@dataclass(frozen=True, eq=False)
class Judged:
    """A head's answer on some rows with their targets: `value` (rows, k), `variance` (rows, k)
    or None, `target` (rows,) class indices for classification else (rows, k), `floor` (k,) the
    variance floor of a regression NLL."""

    value: np.ndarray
    variance: np.ndarray | None
    target: np.ndarray
    floor: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> "Judged":
        """The same answer on a subset (or a bootstrap resample) of its rows."""
        return Judged(self.value[rows], None if self.variance is None else self.variance[rows],
                      self.target[rows], self.floor)


def label_nll(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bernoulli NLL of each label (rows, k): -log of the probability given to what happened."""
    p = np.clip(np.asarray(p, dtype=np.float64), LABEL_EPS, 1 - LABEL_EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def gaussian_nll(mean: np.ndarray, variance: np.ndarray, target: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Gaussian NLL of each target (rows, k) under N(mean, max(variance, floor))."""
    v = np.maximum(variance, floor)
    return 0.5 * (np.log(2 * np.pi * v) + (target - mean) ** 2 / v)


def _predicted(j: Judged) -> np.ndarray:
    """0/1 (rows, k) of each label predicted yes, by contract.tasks' rule."""
    chosen = tasks.predicted_columns("multilabel", j.value)  # binary's one column: the same 0.5 rule
    return chosen.astype(np.float64)


def _regression_nll(j: Judged) -> np.ndarray:
    if j.variance is None:
        return np.full(len(j.value), np.nan)
    return gaussian_nll(j.value, j.variance, j.target, j.floor).sum(axis=1)


def _interval(level: float, width: bool) -> Callable[[Judged], np.ndarray]:
    """The per-row coverage (or mean width) of the served central interval at `level`."""
    def per_row(j: Judged) -> np.ndarray:
        if j.variance is None:
            return np.full(len(j.value), np.nan)
        lower, upper = tasks.interval(tasks.Combined(j.value, j.variance, {}), level)
        return (upper - lower).mean(axis=1) if width else ((j.target >= lower) & (j.target <= upper)).mean(axis=1)
    return per_row


def label_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Per label, the row-weighted gap between the mean probability of yes and the frequency of
    yes over equal-width bins ((b/bins, (b+1)/bins], 0 in the first), averaged over labels."""
    rows, k = p.shape
    # Each label's bins numbered apart; a bin's gap times its share of rows is |sum p - sum y| / rows.
    which = (np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1) + bins * np.arange(k)).ravel()
    gaps = np.abs(np.bincount(which, weights=p.ravel(), minlength=bins * k)
                  - np.bincount(which, weights=np.asarray(y, np.float64).ravel(), minlength=bins * k))
    return float(gaps.sum() / (rows * k)) if rows else float("nan")


def f1_scores(predicted: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(micro F1 pooled over labels, macro F1 averaged over labels) of 0/1 (rows, k) arrays."""
    tp = (predicted * y).sum(axis=0)
    wrong = (predicted != y).sum(axis=0)  # false positives and false negatives
    with np.errstate(invalid="ignore", divide="ignore"):
        per_label = np.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong), 0.0)
    micro = 2 * tp.sum() / (2 * tp.sum() + wrong.sum()) if 2 * tp.sum() + wrong.sum() > 0 else 0.0
    return float(micro), float(per_label.mean())


def r2_per_target(mean: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1 - residual / total sum of squares of each target (a constant target: 1 if exact, else 0)."""
    residual = ((target - mean) ** 2).sum(axis=0)
    total = ((target - target.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1 - residual / total, np.where(residual == 0, 1.0, 0.0))


_LABELS_PER_ROW = {
    "accuracy": lambda j: (_predicted(j) == j.target).all(axis=1).astype(np.float64),
    "hamming_loss": lambda j: (_predicted(j) != j.target).mean(axis=1),
    "nll": lambda j: label_nll(j.value, j.target).sum(axis=1),
    "brier": lambda j: ((j.value - j.target) ** 2).mean(axis=1),
}
# The metrics that are means over rows, by their per-row values; the others are computed whole.
PER_ROW: dict[str, dict[str, Callable[[Judged], np.ndarray]]] = {
    "binary": _LABELS_PER_ROW,
    "multilabel": _LABELS_PER_ROW,
    "regression": {
        "mae": lambda j: np.abs(j.target - j.value).mean(axis=1),
        "nll": _regression_nll,
        **{f"{kind}_{round(level * 100)}": _interval(level, kind == "width")
           for level in LEVELS for kind in ("coverage", "width")},
    },
}
WHOLE: dict[str, dict[str, Callable[[Judged], float]]] = {
    "binary": {"ece": lambda j: label_calibration_error(j.value, j.target),
               "f1": lambda j: f1_scores(_predicted(j), j.target)[0]},  # one label: micro = its F1
    "multilabel": {"ece": lambda j: label_calibration_error(j.value, j.target),
                   "micro_f1": lambda j: f1_scores(_predicted(j), j.target)[0],
                   "macro_f1": lambda j: f1_scores(_predicted(j), j.target)[1]},
    "regression": {"rmse": lambda j: float(np.sqrt(((j.target - j.value) ** 2).mean(axis=0)).mean()),
                   "r2": lambda j: float(r2_per_target(j.value, j.target).mean())},
}


def head_metrics(task: str, judged: Judged) -> dict[str, float]:
    """Every metric of one head's answer on its rows (the module docstring), headline first."""
    if task == "classification":
        return classification_metrics(judged.value, judged.target)
    out = {}
    for metric in HEADLINE[task]:
        per_row = PER_ROW[task].get(metric)
        out[metric] = float(per_row(judged).mean()) if per_row is not None else WHOLE[task][metric](judged)
    if task == "multilabel":
        for j, value in enumerate(label_nll(judged.value, judged.target).mean(axis=0)):
            out[f"{PER_LABEL_NLL}{j}"] = float(value)
    return out


@dataclass(frozen=True)
class HeadDifference(Difference):
    """A `training.compare.Difference` whose direction is read from this module's table, which
    names every task's metrics."""

    @property
    def better(self) -> bool:
        """The ensemble is better on these rows (in the metric's own direction)."""
        return self.difference > 0 if higher_is_better(self.metric) else self.difference < 0


def compare_head(task: str, ensemble: Judged, member: Judged, seed: int = 0,
                 resamples: int = RESAMPLES) -> dict[str, Difference]:
    """Each headline metric of two answers on the same rows, ensemble minus member, with paired
    bootstrap 95% intervals: a mean over rows from the resampled per-row differences, any other
    metric computed on each resample. A metric the member has no value for (NaN) is left out."""
    if task == "classification":
        return compare(ensemble.value, member.value, ensemble.target, seed, resamples)
    out: dict[str, Difference] = {}
    for metric in HEADLINE[task]:
        per_row = PER_ROW[task].get(metric)
        if per_row is not None:
            a, b = per_row(ensemble), per_row(member)
            values = float(a.mean()), float(b.mean())
            draws = bootstrap_means(a - b, resamples, seed) if np.isfinite(values).all() else None
        else:
            whole = WHOLE[task][metric]
            values = whole(ensemble), whole(member)
            draws = np.array([whole(ensemble.take(i)) - whole(member.take(i))
                              for picks in resamples_of(len(ensemble.value), resamples, seed) for i in picks])
        if draws is None:
            continue
        low, high = np.percentile(draws, [2.5, 97.5])
        out[metric] = HeadDifference(metric, values[0], values[1], values[0] - values[1], float(low), float(high))
    return out


# -- one number per row: what selection, calibration and abstention read ----------------------

def row_scores(task: str, answer: tasks.Combined) -> dict[str, np.ndarray]:
    """Each of the task's scores, one per row: the largest over labels or targets (as the server's
    abstention and drift metric reduce them)."""
    return {name: s if s.ndim == 1 else s.max(axis=1) for name, s in answer.scores.items()}


def interval_width(answer: tasks.Combined, level: float) -> np.ndarray:
    """Per row, the widest of its targets' central intervals at `level` (the server's rule)."""
    lower, upper = tasks.interval(answer, level)
    return (upper - lower).max(axis=1)


def row_correct(task: str, answer: tasks.Combined, target: np.ndarray) -> np.ndarray | None:
    """Per row: the predicted class right (classification), its label (binary), every label
    (multi-label); None for regression."""
    if task == "classification":
        return answer.value.argmax(axis=1) == target
    if task == "regression":
        return None
    return (tasks.predicted_columns("multilabel", answer.value) == target).all(axis=1)


def squared_error(answer: tasks.Combined, target: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Per row, the squared error averaged over targets, each divided by its spread (std)."""
    return (((target - answer.value) / spread) ** 2).mean(axis=1)
