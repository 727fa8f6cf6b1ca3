"""What a run's trained members make together, judged as a user would judge it.

From every member's probabilities on the validation and test splits (and on held-out classes,
for the out-of-distribution check):

1. the ensemble: which members it keeps, their weights and its temperature, all chosen on the
   validation split (`selection`);
2. its metrics on the test split before and after calibration, and against the member a user
   would have deployed instead, chosen on validation, with bootstrap intervals (`compare`);
3. its uncertainty per row (`contract.scores`), the abstention threshold fitted on validation for
   the target error and what it gives on test, and how well each score tells wrong answers
   (and unseen classes) from right ones (`abstention`).

Pure NumPy: the pipeline runs the members, this module only reads their outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from contract.scores import SCORES, pool, temper, uncertainty
from training.abstention import Threshold, apply_threshold, auroc, choose_threshold
from training.compare import Difference, compare, select_member
from training.evaluate import classification_metrics
from training.selection import Selection, Weighting, select


@dataclass(frozen=True)
class Probabilities:
    """Every member's probabilities, (members, rows, classes), on the rows of each split."""

    val: np.ndarray
    test: np.ndarray
    ood: np.ndarray | None = None  # rows of classes held out of training


@dataclass(frozen=True)
class Assessment:
    names: list[str]
    selection: Selection
    member_metrics: dict[str, dict[str, float]]  # every member's, on test
    uncalibrated: dict[str, float]  # the kept members' mean on test, before the temperature
    ensemble: dict[str, float]  # what is served, on test
    ensemble_probabilities: np.ndarray  # on test
    uncalibrated_probabilities: np.ndarray
    selected: str  # the member chosen on validation
    versus_selected: dict[str, Difference]
    threshold: Threshold
    test_abstention: tuple[float, float]  # (coverage, risk) on test
    error_auroc: dict[str, float]  # per score: wrong vs right answers on test
    validation_scores: dict[str, float]  # mean of each score on validation
    test_scores: np.ndarray  # (rows, 3)
    test_correct: np.ndarray
    ood_auroc: dict[str, float] | None
    ood_scores: np.ndarray | None

    @property
    def kept(self) -> list[str]:
        return [self.names[i] for i in self.selection.kept]

    def weight_of(self, name: str) -> float:
        """A member's weight in the ensemble (0 if it was left out)."""
        kept = self.kept
        return self.selection.weights[kept.index(name)] if name in kept else 0.0

    def summary(self) -> dict:
        """The parts of the report.json that come from here."""
        return {
            "selection": {"removed": [asdict(r) for r in self.selection.removed], "kept": self.kept},
            "calibration": {"temperature": self.selection.temperature,
                            "test_before": self.uncalibrated, "test_after": self.ensemble},
            "versus_selected_member": {
                "member": self.selected, "chosen_on": "lowest validation NLL", "rows": "test split",
                "differences": {m: {**asdict(d), "better": d.better, "significant": d.significant}
                                for m, d in self.versus_selected.items()}},
            "abstention": {**asdict(self.threshold), "test_coverage": self.test_abstention[0],
                           "test_risk": self.test_abstention[1]},
            "uncertainty": {"error_auroc_test": self.error_auroc, "validation_mean": self.validation_scores},
            **({"ood": {"auroc": self.ood_auroc, "rows": len(self.ood_scores)}} if self.ood_auroc else {}),
        }


def _scores(probs: np.ndarray, selection: Selection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the kept members' mean, served (calibrated) probabilities, uncertainty scores) of the
    ensemble on one split's member outputs."""
    members = np.moveaxis(probs[selection.kept], 0, 1)  # (rows, kept, classes)
    mean = pool(members, selection.weights)
    out = temper(mean, selection.temperature)
    return mean, out, uncertainty(out, members, selection.weights)


def assess(names: list[str], probs: Probabilities, val_labels: np.ndarray, test_labels: np.ndarray,
           weighting: Weighting, calibrate: bool, target_error: float, seed: int,
           min_members: int = 1) -> Assessment:
    """The ensemble of these members, chosen on validation and judged on test (module docstring);
    pruning keeps at least `min_members`."""
    chosen = select(names, probs.val, val_labels, weighting, calibrate, seed, min_members)
    raw, ensemble, test_scores = _scores(probs.test, chosen)
    selected = select_member(names, probs.val, val_labels)

    _, val_served, val_scores = _scores(probs.val, chosen)
    threshold = choose_threshold(val_scores, np.argmax(val_served, axis=1) == val_labels, target_error)
    correct = np.argmax(ensemble, axis=1) == test_labels
    ood_scores = _scores(probs.ood, chosen)[2] if probs.ood is not None and len(probs.ood[0]) else None
    ood_auroc = None
    if ood_scores is not None:
        both = np.concatenate([test_scores, ood_scores])
        unseen = np.r_[np.zeros(len(test_scores), bool), np.ones(len(ood_scores), bool)]
        ood_auroc = {s: auroc(both[:, j], unseen) for j, s in enumerate(SCORES)}
    return Assessment(
        names=names,
        selection=chosen,
        member_metrics={n: classification_metrics(p, test_labels) for n, p in zip(names, probs.test)},
        uncalibrated=classification_metrics(raw, test_labels),
        ensemble=classification_metrics(ensemble, test_labels),
        ensemble_probabilities=ensemble,
        uncalibrated_probabilities=raw,
        selected=selected,
        versus_selected=compare(ensemble, probs.test[names.index(selected)], test_labels, seed),
        threshold=threshold,
        test_abstention=apply_threshold(test_scores, correct, threshold),
        error_auroc={s: auroc(test_scores[:, j], ~correct) for j, s in enumerate(SCORES)},
        validation_scores={s: float(val_scores[:, j].mean()) for j, s in enumerate(SCORES)},
        test_scores=test_scores,
        test_correct=correct,
        ood_auroc=ood_auroc,
        ood_scores=ood_scores,
    )
