"""Hyperparameter search with Keras Tuner.

The tuner's project folder is named after the data fingerprint and the budget, and opened with
`overwrite=False`: running the same search again resumes it (or finds it finished) instead of
starting over.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt

from training.data import FitSplits, Splits
from training.hypermodel import EnsembleHyperModel, TableHyperModel
from training.progress import Display, SearchProgress, hyperband_budgets, logged_value

TUNERS = ("hyperband", "random", "bayesian")
OBJECTIVES = ("val_accuracy", "val_loss")


@dataclass(frozen=True)
class SearchBudget:
    """How much searching to do. Hyperband's cost grows with max_epochs * log(max_epochs);
    random and Bayesian search run `max_trials` trials of `max_epochs` epochs each."""

    tuner: str = "hyperband"
    max_epochs: int = 9
    factor: int = 3
    max_trials: int = 10
    objective: str = "val_accuracy"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.tuner not in TUNERS:
            raise ValueError(f"unknown tuner {self.tuner!r}: choose one of {', '.join(TUNERS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.max_epochs < 1:
            raise ValueError(f"--max-epochs must be at least 1, got {self.max_epochs}")
        if self.factor < 2:
            raise ValueError(f"--factor (Hyperband) must be at least 2, got {self.factor}")
        if self.max_trials < 1:
            raise ValueError(f"--max-trials must be at least 1, got {self.max_trials}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")

    def key(self) -> str:
        """Short stable digest of the budget, part of the tuner's project name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]

    def describe(self) -> str:
        if self.tuner == "hyperband":
            return f"hyperband, max_epochs={self.max_epochs}, factor={self.factor}, objective={self.objective}"
        return f"{self.tuner}, {self.max_trials} trials of {self.max_epochs} epochs, objective={self.objective}"


def is_distributed_worker() -> bool:
    """True in a Keras Tuner worker process (KERASTUNER_TUNER_ID set, and not the chief)."""
    return bool(os.environ.get("KERASTUNER_ORACLE_IP")) and "chief" not in os.environ.get("KERASTUNER_TUNER_ID", "")


def make_tuner(hypermodel: kt.HyperModel, budget: SearchBudget, directory: Path, project: str, seed: int):
    """The Keras Tuner tuner named by the budget, resuming its project folder if it exists."""
    common = dict(objective=budget.objective, seed=seed, directory=str(directory),
                  project_name=f"{project}-{budget.key()}", overwrite=False)
    if budget.tuner == "hyperband":
        return kt.Hyperband(hypermodel, max_epochs=budget.max_epochs, factor=budget.factor,
                            hyperband_iterations=1, **common)
    if budget.tuner == "random":
        return kt.RandomSearch(hypermodel, max_trials=budget.max_trials, **common)
    return kt.BayesianOptimization(hypermodel, max_trials=budget.max_trials, **common)


class TrialProgress(keras.callbacks.Callback):
    """Feeds the search's progress from inside every trial: the tuner itself only speaks in verbose mode."""

    def __init__(self, progress: SearchProgress):
        super().__init__()
        self.progress = progress
        self.first: int | None = None
        self.ran = 0
        self.best: float | None = None

    def __deepcopy__(self, memo):
        # Keras Tuner deep-copies callbacks for every trial; one shared progress is the point.
        return self

    def on_train_begin(self, logs=None):
        self.first, self.ran, self.best = None, 0, None

    def on_epoch_begin(self, epoch, logs=None):
        if self.first is None:  # Hyperband's promoted trials start at their initial epoch
            self.first = epoch

    def on_epoch_end(self, epoch, logs=None):
        value = logged_value(logs, self.progress.objective)
        # Keras Tuner scores a trial by its best epoch; so does its line.
        if self.progress.better(value, self.best):
            self.best = value
        self.ran += 1
        first = self.first or 0
        self.progress.epoch(epoch + 1 - first, self.params.get("epochs", epoch + 1) - first, value)

    def on_train_end(self, logs=None):
        self.progress.trial_done(self.ran, self.best)


def planned_trials(tuner: kt.Tuner, budget: SearchBudget) -> list[int]:
    """The epochs of every trial the search will run, in order: read from Hyperband's oracle where it
    can be (a distributed worker's oracle is a client that hides them), else from the budget."""
    if budget.tuner != "hyperband":
        return [budget.max_epochs] * budget.max_trials
    oracle = tuner.oracle
    return hyperband_budgets(getattr(oracle, "max_epochs", budget.max_epochs),
                             getattr(oracle, "factor", budget.factor),
                             getattr(oracle, "min_epochs", 1),
                             getattr(oracle, "hyperband_iterations", 1))


def _finished_before(tuner: kt.Tuner) -> tuple[int, float | None]:
    """Trials a resumed search had already finished, and their best score (none known in a worker)."""
    trials = getattr(tuner.oracle, "trials", None)
    if not isinstance(trials, dict):
        return 0, None
    finished = [t for t in trials.values() if t.status == kt.engine.trial.TrialStatus.COMPLETED]
    scores = [t.score for t in finished if t.score is not None]
    if not scores:
        return len(finished), None
    return len(finished), (min if tuner.oracle.objective.direction == "min" else max)(scores)


def search(
    hypermodel: EnsembleHyperModel | TableHyperModel,
    splits: Splits | FitSplits,
    budget: SearchBudget,
    directory: Path,
    project: str,
    seed: int,
    report: Callable[[str], None] = print,
    verbose: int = 0,
    display: Display | None = None,
) -> list[kt.HyperParameters]:
    """Run (or resume) the search and return every configuration, best first (none in a worker)."""
    tuner = make_tuner(hypermodel, budget, directory, project, seed)
    done, best = _finished_before(tuner)
    progress = SearchProgress(display or Display(report), budget.objective,
                              tuner.oracle.objective.direction == "min", planned_trials(tuner, budget),
                              done, best, worker=is_distributed_worker())
    epochs = {} if budget.tuner == "hyperband" else {"epochs": budget.max_epochs}
    with warnings.catch_warnings():
        # Hyperband resumes promoted trials from checkpoints without their optimizer state,
        # on purpose; Keras warns about it on every promotion.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        tuner.search(
            splits.train.x,
            splits.train.y,
            validation_data=(splits.val.x, splits.val.y),
            batch_size=budget.batch_size,
            callbacks=[TrialProgress(progress)],
            verbose=verbose,
            **epochs,
        )
    if is_distributed_worker():
        return []  # a worker only runs trials; the chief ranks them
    return tuner.get_best_hyperparameters(num_trials=len(tuner.oracle.trials) or 1)
