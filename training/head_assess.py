"""One head of any task, judged as `training.assess` judges a format-1 ensemble, in the terms of
`contract.tasks`, so that what the trainer measures is what the server serves: every served
value here is `contract.tasks.combine` of the kept members' outputs with their weights and the
fitted calibration, exactly the call the server makes with the published `HeadSpec`.

From every member's raw outputs for the head on the validation and test splits:

1. **Selection on validation** (`select_head`), as `training.selection`: `pruned` drops, one at
   a time, the member whose removal lowers the calibrated ensemble's per-row validation NLL the
   most, while the paired bootstrap 95% interval of that change lies entirely below zero, never
   below `min_members`; `fitted` takes the convex weights minimising the pooled ensemble's
   validation NLL; `uniform` keeps all with equal weights. The per-row NLL of each task: −log
   p(label) (classification); the Bernoulli NLL summed over labels (binary, multi-label); the
   Gaussian NLL of the members' mixture, moment-matched to one normal (contract.tasks.regression,
   after Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty Estimation
   using Deep Ensembles"), summed over targets.
2. **Calibration on validation** (`fit_calibration`): one temperature on the pooled softmax
   (Guo et al. 2017, "On Calibration of Modern Neural Networks"; `training.calibration`); one
   temperature per label on the logit of the pooled probability (binary: its one label), each
   the maximum a posteriori value under `fit_temperature`'s weak prior; for regression the
   variance scale s (variance = s × (aleatoric + epistemic)) minimising the Gaussian NLL under
   a weak normal prior on log s (`training.calibration.fit_variance_scale`). Without the prior
   and the floor the best s has a closed form, the mean over rows and targets of
   (target − mean)² / variance.
3. **Metrics on test** (`training.task_metrics`) of every member alone, the pooled ensemble before
   calibration and the served one; the member a user would have deployed (lowest validation
   NLL; a means-only regression head's members have no NLL: lowest validation mean squared
   error) against the served ensemble on test, with paired bootstrap intervals.
4. **Abstention on validation**, reduced to one score per row as the server reduces it
   (`service.answer.combined_head`: a score of several labels or targets is their maximum, and
   a row abstains when it is above the threshold). Classification, binary, multi-label:
   `training.abstention.choose_threshold` over the task's scores, a row being wrong when its
   predicted class is wrong (binary: its label; multi-label: any label). Regression: the width
   of the central interval at ABSTAIN_LEVEL (`interval_width`, the widest of the targets); the
   threshold is the largest width whose answered validation rows have a normalised RMSE at most
   `target_error` (errors divided by each target's validation standard deviation, squared,
   averaged over targets and rows; `training.abstention.fit_rms_threshold`): it reads as a share
   of the target's spread,
   not of rows, and needs a regression value of its own (a classification default such as 0.02
   is rarely reachable). No abstention when `target_error` is None or nothing can be answered.
5. **The uncertainty reference**: the validation mean of each of the task's scores, reduced per
   row as above: the level the server's drift metric (`ensemble_head_uncertainty`, reduced the
   same way) is compared with.

A means-only regression head (no variance output) serves s × the spread of its members' means.
Where they agree exactly that variance is 0: the served interval has no width, whatever s. The
training side's Gaussian NLL floors the variance at NLL_VARIANCE_FLOOR × the target's
validation variance (`variance_floor`), so such rows cost a large, finite NLL (and s is fitted
on finite numbers); the served values are not floored, and `degenerate` reports the share of
validation values at the floor. Pruning such a head does not come down to one member, whatever
`min_members`: one member alone has no spread, so every row sits at the floor and its NLL is far
the worst.

Pure NumPy and SciPy: the pipeline runs the members, this module only reads their outputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize

from contract import tasks
from contract.manifest import TASK_SCORES, TASKS, HeadAbstention, HeadSpec, uniform_weights
from training.abstention import Threshold, auroc, choose_threshold, fit_rms_threshold, fit_threshold
from training.calibration import (
    S_MAX,
    S_MIN,
    fit_label_temperatures,
    fit_temperature,
    fit_variance_scale,
    tempered_losses,
)
from training.compare import RESAMPLES, Difference, select_member
from training.evaluate import format_table
from training.selection import Removal, Weighting, prune_by
from training.task_metrics import (
    HEADLINE,
    Judged,
    compare_head,
    gaussian_nll,
    head_metrics,
    interval_width,
    label_nll,
    row_correct,
    row_scores,
    squared_error,
)
from training.weighting import fit_weights, floor_and_normalise

ABSTAIN_LEVEL = 0.9  # the central interval whose width a regression head abstains on
NLL_VARIANCE_FLOOR = 1e-6  # of the target's validation variance: a std of 0.1% of the target's


@dataclass(frozen=True, eq=False)
class MemberOutputs:
    """One split's member outputs for one head in contract.tasks' layout: `values` (rows,
    members, k) (probabilities or means), `variances` (rows, members, k) of a Gaussian head."""

    values: np.ndarray
    variances: np.ndarray | None = None

    def of(self, members: Sequence[int]) -> "MemberOutputs":
        """The outputs of some members only."""
        idx = list(members)
        return MemberOutputs(self.values[:, idx], None if self.variances is None else self.variances[:, idx])

    def combine(self, task: str, weights: Sequence[float],
                calibration: Sequence[float] | float = 1.0) -> tasks.Combined:
        """The served answer of these members: contract.tasks.combine, as the server calls it."""
        return tasks.combine(task, self.values, weights, calibration, self.variances)

    def member(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(value (rows, k), variance or None) of member i alone."""
        return self.values[:, i], None if self.variances is None else self.variances[:, i]


def member_outputs(task: str, raw: np.ndarray, variance: bool) -> MemberOutputs:
    """The members' raw outputs for one head, (members, rows, c) as the members emit them (a
    Gaussian regression head: k means then k variances), in contract.tasks' layout."""
    raw = np.asarray(raw)
    if raw.ndim != 3:
        raise ValueError(f"expected the members' outputs as (members, rows, columns), got shape {raw.shape}")
    if variance and task != "regression":
        raise ValueError(f"only a regression head has a variance output, not a {task} head")
    c = raw.shape[2]
    if task == "binary" and c != 1:
        raise ValueError(f"a binary head emits one column (the positive label's probability), got {c}")
    if task == "classification" and c < 2:
        raise ValueError(f"a classification head emits at least two probabilities, got {c}")
    if variance and c % 2:
        raise ValueError(f"a Gaussian regression head emits k means then k variances (an even count), got {c}")
    rows_first = np.moveaxis(raw, 0, 1)  # (rows, members, c)
    if variance:
        return MemberOutputs(rows_first[..., : c // 2], rows_first[..., c // 2:])
    return MemberOutputs(rows_first)


def head_target(task: str, target: np.ndarray, columns: int) -> np.ndarray:
    """A split's targets in the shape the metrics read: class indices (rows,) for
    classification, else (rows, k) float (binary: its one column)."""
    target = np.asarray(target)
    if task == "classification":
        return target.astype(np.int64).reshape(-1)
    target = target.reshape(len(target), -1).astype(np.float64)
    if target.shape[1] != columns:
        raise ValueError(f"a {task} head of {columns} column(s) needs targets of {columns} column(s), "
                         f"got {target.shape[1]}")
    return target


def target_spread(task: str, val_target: np.ndarray) -> np.ndarray | None:
    """Each regression target's validation standard deviation (1 for a constant target: its
    errors in its own units), the unit of a regression abstention's error; None otherwise."""
    if task != "regression":
        return None
    spread = np.std(val_target, axis=0)
    return np.where(spread > 0, spread, 1.0)


def variance_floor(task: str, val_target: np.ndarray) -> np.ndarray | None:
    """The variance floor of a regression NLL, (k,): NLL_VARIANCE_FLOOR × each target's validation
    variance (at least the smallest normal float64); None for the other tasks."""
    if task != "regression":
        return None
    return np.maximum(NLL_VARIANCE_FLOOR * np.var(val_target, axis=0), np.finfo(np.float64).tiny)


# -- calibration --------------------------------------------------------------------------------

def fit_calibration(task: str, pooled: tasks.Combined, target: np.ndarray,
                    floor: np.ndarray | None) -> tuple[float, ...]:
    """The calibration of an uncalibrated (pooled) answer on validation rows, as the contract
    stores it: (T,) classification and binary, one T per label multi-label, (s,) regression."""
    if task == "classification":
        return (fit_temperature(pooled.value, target),)
    if task == "regression":
        return (fit_variance_scale(pooled.value, pooled.variance, target, floor),)
    return fit_label_temperatures(pooled.value, target)


def served_calibration(task: str, calibration: tuple[float, ...]) -> float | tuple[float, ...]:
    """The calibration as the server passes it to contract.tasks.combine."""
    return calibration if task in ("binary", "multilabel") else calibration[0]


def row_nll(task: str, answer: tasks.Combined, target: np.ndarray, floor: np.ndarray | None) -> np.ndarray:
    """The per-row NLL of an answer (module docstring, 1)."""
    if task == "classification":
        return tempered_losses(answer.value, target, 1.0)
    if task == "regression":
        return gaussian_nll(answer.value, answer.variance, target, floor).sum(axis=1)
    return label_nll(answer.value, target).sum(axis=1)


# -- selection ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSelection:
    """Members kept (indices), their weights, the calibration as the contract stores it
    (`fit_calibration`; 1s when not calibrated) and the removals with their evidence."""

    kept: list[int]
    weights: list[float]
    calibration: tuple[float, ...]
    removed: list[Removal] = field(default_factory=list)


def calibrated_losses(task: str, outputs: MemberOutputs, target: np.ndarray, weights: Sequence[float],
                      calibrate: bool, floor: np.ndarray | None) -> np.ndarray:
    """Per row: the NLL of these members' ensemble, calibrated on the same rows when asked."""
    pooled = outputs.combine(task, weights)
    if not calibrate:
        return row_nll(task, pooled, target, floor)
    if task == "classification":  # as training.selection: in log space, no second clip
        return tempered_losses(pooled.value, target, fit_temperature(pooled.value, target))
    calibration = fit_calibration(task, pooled, target, floor)
    return row_nll(task, outputs.combine(task, weights, served_calibration(task, calibration)), target, floor)


def _convex_weights(members: int, loss: Callable[[np.ndarray], float]) -> list[float]:
    """The weights on the simplex minimising `loss` (softmax parameters, as training.weighting)."""
    if members == 1:
        return [1.0]

    def of(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()

    return floor_and_normalise(of(minimize(lambda z: loss(of(z)), np.zeros(members), method="L-BFGS-B").x))


def fitted_weights(task: str, outputs: MemberOutputs, target: np.ndarray, floor: np.ndarray | None) -> list[float]:
    """Convex weights minimising the pooled (uncalibrated) ensemble's mean validation NLL; for
    regression with the variance scale at its closed-form best for each candidate (otherwise a
    means-only mixture's NLL at s = 1 would rather judge the spread than the mix)."""
    if task == "classification":
        return fit_weights(np.moveaxis(outputs.values, 1, 0), target)

    def loss(w: np.ndarray) -> float:
        pooled = outputs.combine(task, w)
        if task != "regression":
            return float(row_nll(task, pooled, target, floor).mean())
        v = np.maximum(pooled.variance, floor)
        s = float(np.clip(np.mean((target - pooled.value) ** 2 / v), S_MIN, S_MAX))
        return float(gaussian_nll(pooled.value, s * v, target, floor).sum(axis=1).mean())

    return _convex_weights(outputs.values.shape[1], loss)


def select_head(task: str, names: Sequence[str], outputs: MemberOutputs, target: np.ndarray, weighting: Weighting,
                calibrate: bool = True, min_members: int = 2, seed: int = 0, floor: np.ndarray | None = None,
                chosen: tuple[list[int], list[float]] | None = None, resamples: int = RESAMPLES) -> HeadSelection:
    """Members kept, their weights and the calibration, from validation outputs (module
    docstring); `chosen` (members, weights) fixes the members, and only the calibration is fitted."""
    kept, removed = list(range(len(names))), []
    if chosen is not None:
        kept, weights = chosen
    elif weighting == "pruned":
        def losses(members: list[int]) -> np.ndarray:
            return calibrated_losses(task, outputs.of(members), target, uniform_weights(len(members)), calibrate, floor)

        kept, removed = prune_by(names, losses, min_members, seed, resamples)
        weights = uniform_weights(len(kept))
    elif weighting == "fitted":
        weights = fitted_weights(task, outputs, target, floor)
    elif weighting == "uniform":
        weights = uniform_weights(len(names))
    else:
        raise ValueError(f"weighting must be one of pruned, fitted, uniform, got {weighting!r}")
    if calibrate:
        calibration = fit_calibration(task, outputs.of(kept).combine(task, weights), target, floor)
    else:
        calibration = (1.0,) * (outputs.values.shape[2] if task == "multilabel" else 1)
    return HeadSelection(kept, weights, calibration, removed)


def pick_member(task: str, names: Sequence[str], outputs: MemberOutputs, target: np.ndarray,
                floor: np.ndarray | None) -> str:
    """The member a user would deploy: lowest validation NLL (ties: the first); a means-only
    regression head's members, which have no NLL, by lowest validation mean squared error."""
    if task == "classification":
        return select_member(list(names), np.moveaxis(outputs.values, 1, 0), target)
    losses = []
    for i in range(len(names)):
        value, variance = outputs.member(i)
        if task != "regression":
            losses.append(float(label_nll(value, target).sum(axis=1).mean()))
        elif variance is None:
            losses.append(float(np.mean((target - value) ** 2)))
        else:
            losses.append(float(gaussian_nll(value, variance, target, floor).sum(axis=1).mean()))
    return names[int(np.argmin(losses))]


# -- abstention and uncertainty -----------------------------------------------------------------

@dataclass(frozen=True)
class HeadThreshold(Threshold):
    """An abstention threshold (training.abstention.Threshold) and, for `interval_width`, the
    interval's level; `risk` is an error rate, or a normalised RMSE for regression."""

    level: float | None = None


def abstention_outcome(task: str, answer: tasks.Combined, target: np.ndarray, chosen: HeadThreshold,
                       spread: np.ndarray | None) -> tuple[float, float]:
    """(coverage, risk) of a threshold on other rows (the test split)."""
    if chosen.level is not None:
        score = interval_width(answer, chosen.level)
    else:
        score = row_scores(task, answer)[chosen.score]
    answered = score <= chosen.threshold
    coverage = float(answered.mean()) if len(answered) else 0.0
    if not answered.any():
        return coverage, 0.0
    if task == "regression":
        return coverage, float(np.sqrt(squared_error(answer, target, spread)[answered].mean()))
    return coverage, float((~row_correct(task, answer, target)[answered]).mean())


def fit_abstention(task: str, answer: tasks.Combined, target: np.ndarray, target_error: float,
                   spread: np.ndarray | None, total_only: bool = False) -> HeadThreshold:
    """The abstention threshold on validation rows (module docstring, 4); `total_only`: on the
    value's own entropy only, the one score the server computes from the value alone (for
    cross-fitted members, `training.crossfit`, whose other scores the server computes over every
    fold model, not over the members the threshold is fitted on)."""
    if task == "regression":
        width, loss = interval_width(answer, ABSTAIN_LEVEL), squared_error(answer, target, spread)
        threshold, coverage, risk = fit_rms_threshold(width, loss, target_error)
        return HeadThreshold("interval_width", threshold, target_error, coverage, risk, ABSTAIN_LEVEL)
    scores = row_scores(task, answer)
    if total_only:
        threshold, coverage, risk = fit_threshold(scores["entropy"], row_correct(task, answer, target), target_error)
        return HeadThreshold("entropy", threshold, target_error, coverage, risk, None)
    chosen = choose_threshold(np.stack([scores[s] for s in TASK_SCORES[task]], axis=1),
                              row_correct(task, answer, target), target_error)
    return HeadThreshold(**asdict(chosen))


def wrong_rows(task: str, answer: tasks.Combined, target: np.ndarray, spread: np.ndarray | None) -> np.ndarray:
    """Rows counted wrong for the uncertainty AUROCs: a wrong prediction; for regression an error
    above the median (normalised squared error averaged over targets)."""
    if task == "regression":
        loss = squared_error(answer, target, spread)
        return loss > np.median(loss)
    return ~row_correct(task, answer, target)


# -- the assessment -----------------------------------------------------------------------------

def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    """A metrics dict for JSON: NaN (a metric a member cannot have) as None."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


@dataclass(frozen=True, eq=False)
class HeadAssessment:
    """One head's ensemble, chosen on validation and judged on test (module docstring).

    `served` is contract.tasks.combine of the kept members' test outputs with the weights and
    calibration: what the server answers for those rows; `pooled` the same uncalibrated.
    `threshold` is None when no target error was given; a threshold of coverage 0 is reported
    but not published. `degenerate`: share of validation values whose uncalibrated variance is
    at the NLL floor (regression; 0 otherwise); `floor` that floor (k,) (regression; else None),
    to measure another version's answer the same way (`measure_answer`)."""

    task: str
    names: list[str]
    variance: bool
    calibrated: bool
    selection: HeadSelection
    member_metrics: dict[str, dict[str, float]]
    uncalibrated: dict[str, float]
    ensemble: dict[str, float]
    served: tasks.Combined
    pooled: tasks.Combined
    selected: str
    versus_selected: dict[str, Difference]
    threshold: HeadThreshold | None
    test_abstention: tuple[float, float] | None
    error_auroc: dict[str, float]
    validation_scores: dict[str, float]
    degenerate: float = 0.0
    floor: np.ndarray | None = None

    @property
    def kept(self) -> list[str]:
        return [self.names[i] for i in self.selection.kept]

    @property
    def weights(self) -> list[float]:
        return list(self.selection.weights)

    def weight_of(self, name: str) -> float:
        """A member's weight in the ensemble (0 if it was left out)."""
        kept = self.kept
        return self.selection.weights[kept.index(name)] if name in kept else 0.0

    @property
    def chosen_on(self) -> str:
        """How the member compared with was chosen on validation."""
        means_only = self.task == "regression" and not self.variance
        return "lowest validation mean squared error" if means_only else "lowest validation NLL"

    def abstention(self) -> HeadAbstention | None:
        """The abstention rule to publish: none without a threshold that answers some rows."""
        t = self.threshold
        if t is None or t.coverage <= 0:
            return None
        return HeadAbstention(score=t.score, threshold=t.threshold, level=t.level)

    def head_spec(self, name: str, labels: Sequence[str]) -> HeadSpec:
        """The head as the manifest publishes it (`labels`: a binary head's negative then positive)."""
        columns = self.served.value.shape[1]
        want = 2 if self.task == "binary" else columns
        if len(labels) != want:
            raise ValueError(f"head {name!r}: a {self.task} head of {columns} column(s) has {want} labels, "
                             f"got {len(labels)}")
        regression = self.task == "regression"
        return HeadSpec(name=name, task=self.task, labels=tuple(labels), variance=self.variance,
                        temperatures=self.selection.calibration if self.calibrated and not regression else (),
                        variance_scale=self.selection.calibration[0] if self.calibrated and regression else 1.0,
                        abstention=self.abstention(), uncertainty_reference=dict(self.validation_scores))

    def summary(self) -> dict:
        """The parts of a run's report.json about this head (JSON-able: NaN as null)."""
        t = self.threshold
        return {
            "task": self.task,
            "selection": {"kept": self.kept, "weights": self.weights,
                          "removed": [asdict(r) for r in self.selection.removed]},
            "calibration": {("variance_scale" if self.task == "regression" else "temperatures"):
                            list(self.selection.calibration) if self.calibrated else None,
                            "test_before": _finite(self.uncalibrated), "test_after": _finite(self.ensemble),
                            **({"degenerate_share": self.degenerate} if self.task == "regression" else {})},
            "members": {n: _finite(m) for n, m in self.member_metrics.items()},
            "versus_selected_member": {
                "member": self.selected, "chosen_on": self.chosen_on, "rows": "test split",
                "differences": {m: {**asdict(d), "better": d.better, "significant": d.significant}
                                for m, d in self.versus_selected.items()}},
            "abstention": None if t is None else {**asdict(t), "test_coverage": self.test_abstention[0],
                                                  "test_risk": self.test_abstention[1]},
            "uncertainty": {"error_auroc_test": _finite(self.error_auroc), "validation_mean": self.validation_scores},
        }

    def describe(self, head: str = "", kinds: dict[str, str] | None = None) -> list[str]:
        """What the trainer prints about this head: members kept, calibration before -> after,
        the metric table, the comparison with the member chosen on validation, abstention."""
        tag = (lambda what: f"[{what} {head}]") if head else (lambda what: f"[{what}]")
        kinds = kinds or {}
        weights = ", ".join(f"{n}={self.weight_of(n):.3f}" for n in self.kept)
        left_out = ", ".join(r.member for r in self.selection.removed)
        lines = [f"{tag('ensemble')} {self.task}: kept {weights}" + (f"; left out {left_out}" if left_out else "")]
        lines += [f"{tag('ensemble')} without {r.member}, validation NLL per row changes by {r.change:+.4f} "
                  f"[{r.low:+.4f}, {r.high:+.4f}]: left out" for r in self.selection.removed]
        what = "variance scale" if self.task == "regression" else "temperature"
        fitted = ", ".join(f"{c:.3f}" for c in self.selection.calibration)
        changes = ", ".join(f"{m} {self.uncalibrated[m]:.4f} -> {self.ensemble[m]:.4f}"
                            for m in ("nll", "ece", "coverage_90") if m in self.ensemble)
        lines.append(f"{tag('calibration')} {what} {fitted} ({'fitted on validation' if self.calibrated else 'none'});"
                     f" test {changes}")
        if self.degenerate > 0:
            lines.append(f"{tag('calibration')} WARNING: on {self.degenerate:.1%} of validation values the members "
                         "agree exactly, so the served variance there is 0 and its interval has no width "
                         "(a Gaussian head, variance=True, gives each member a variance of its own)")
        rows = {f"{n} ({kinds.get(n, 'member')}{'' if n in self.kept else ', left out'})": m
                for n, m in self.member_metrics.items()}
        lines.append(f"{tag('evaluate')} held-out test split, {len(self.served.value)} rows:\n"
                     + format_table({**rows, "ENSEMBLE": self.ensemble}, HEADLINE[self.task]))
        lines.append(f"{tag('evaluate')} against {self.selected}, the member chosen on validation ({self.chosen_on}), "
                     "on the test split, ensemble minus member with bootstrap 95% intervals:")
        lines += [f"{tag('evaluate')}   {d.sentence()}" for d in self.versus_selected.values()]
        t = self.threshold
        if t is not None and t.coverage > 0:
            measure = "normalised RMSE" if self.task == "regression" else "errors"
            score = f"{t.score} at {t.level:g}" if t.level is not None else t.score
            lines.append(f"{tag('abstain')} {score} above {t.threshold:.4f}: {measure} at most {t.target_error:.1%} "
                         f"among the answered validation rows, answering {t.coverage:.1%}; on test it answers "
                         f"{self.test_abstention[0]:.1%} with {measure} {self.test_abstention[1]:.1%}")
        elif t is not None:
            lines.append(f"{tag('abstain')} WARNING: not even the most certain validation rows meet "
                         f"{t.target_error:.1%}; no abstention rule is published (raise the target error)")
        lines.append(f"{tag('uncertainty')} AUROC for telling wrong answers from right ones on test: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in self.error_auroc.items()))
        return lines


def measure_answer(task: str, answer: tasks.Combined, target: np.ndarray,
                   floor: np.ndarray | None = None) -> dict[str, float]:
    """Every metric (training.task_metrics) of a served answer on these rows' raw targets: a
    published version's, for the gate, measured as the assessment measures its own. `floor`: the
    regression NLL's variance floor (default: from these targets, `variance_floor`)."""
    y = head_target(task, target, answer.value.shape[1])
    floor = variance_floor(task, y) if floor is None else floor
    variance = None if answer.variance is None else np.asarray(answer.variance, np.float64)
    return head_metrics(task, Judged(np.asarray(answer.value, np.float64), variance, y, floor))


def _check(task: str, names: list[str], val: MemberOutputs, test: MemberOutputs, min_members: int,
           target_error: float | None, chosen: tuple[Sequence[str], Sequence[float]] | None) -> None:
    """Refuse arguments that cannot describe one head's members, saying what to change."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    for split, outputs in (("validation", val), ("test", test)):
        if outputs.values.shape[1] != len(names):
            raise ValueError(f"{len(names)} member names but {outputs.values.shape[1]} members' {split} outputs")
    if val.values.shape[2] != test.values.shape[2]:
        raise ValueError(f"validation outputs have {val.values.shape[2]} columns, test {test.values.shape[2]}")
    if min_members < 1:
        raise ValueError(f"min_members must be at least 1, got {min_members}")
    if target_error is not None and not target_error > 0:
        raise ValueError(f"target_error must be above 0 (or None: no abstention), got {target_error}")
    if chosen is not None and (set(chosen[0]) - set(names) or len(chosen[0]) != len(chosen[1])):
        raise ValueError(f"chosen must pair names among {names} with their weights, got {list(zip(*chosen))}")


def assess_head(task: str, names: Sequence[str], val: np.ndarray, test: np.ndarray, val_target: np.ndarray,
                test_target: np.ndarray, *, variance: bool = False, weighting: Weighting = "pruned",
                calibrate: bool = True, target_error: float | None = None, seed: int = 0, min_members: int = 2,
                chosen: tuple[Sequence[str], Sequence[float]] | None = None,
                total_only: bool = False) -> HeadAssessment:
    """One head's ensemble from its members' raw outputs (members, rows, columns) on validation and
    test, chosen on validation and judged on test (module docstring). `chosen` (member names,
    weights) fixes the members instead of selecting them: a format-2 manifest has one set of
    weights for all its heads, so a second head is judged with the first head's choice. `total_only`:
    abstain on the served value's entropy only (`fit_abstention`)."""
    names = list(names)
    val_out, test_out = member_outputs(task, val, variance), member_outputs(task, test, variance)
    _check(task, names, val_out, test_out, min_members, target_error, chosen)
    k = val_out.values.shape[2]
    y_val, y_test = head_target(task, val_target, k), head_target(task, test_target, k)
    floor = variance_floor(task, y_val)
    fixed = None if chosen is None else ([names.index(n) for n in chosen[0]], [float(w) for w in chosen[1]])
    selection = select_head(task, names, val_out, y_val, weighting, calibrate, min_members, seed, floor, fixed)
    served_as = served_calibration(task, selection.calibration)
    kept_val, kept_test = val_out.of(selection.kept), test_out.of(selection.kept)
    served_val = kept_val.combine(task, selection.weights, served_as)
    served_test = kept_test.combine(task, selection.weights, served_as)
    pooled_test = kept_test.combine(task, selection.weights)

    def judged(answer_value: np.ndarray, answer_variance: np.ndarray | None) -> Judged:
        as_float = None if answer_variance is None else np.asarray(answer_variance, np.float64)
        return Judged(np.asarray(answer_value, np.float64), as_float, y_test, floor)

    members = {n: judged(*test_out.member(i)) for i, n in enumerate(names)}
    ensemble = judged(served_test.value, served_test.variance)
    selected = pick_member(task, names, val_out, y_val, floor)
    spread = target_spread(task, y_val)
    threshold = (fit_abstention(task, served_val, y_val, target_error, spread, total_only)
                 if target_error is not None else None)
    test_scores = row_scores(task, served_test)
    wrong = wrong_rows(task, served_test, y_test, spread)
    degenerate = 0.0
    if task == "regression":
        degenerate = float(np.mean(kept_val.combine(task, selection.weights).variance <= floor))
    return HeadAssessment(
        task=task, names=names, variance=variance, calibrated=calibrate, selection=selection,
        member_metrics={n: head_metrics(task, j) for n, j in members.items()},
        uncalibrated=measure_answer(task, pooled_test, test_target, floor),
        ensemble=head_metrics(task, ensemble),
        served=served_test, pooled=pooled_test, selected=selected,
        versus_selected=compare_head(task, ensemble, members[selected], seed),
        threshold=threshold,
        test_abstention=(abstention_outcome(task, served_test, y_test, threshold, spread)
                         if threshold is not None else None),
        error_auroc={s: auroc(v, wrong) for s, v in test_scores.items()},
        validation_scores={s: float(v.mean()) for s, v in row_scores(task, served_val).items()},
        degenerate=degenerate,
        floor=floor,
    )
