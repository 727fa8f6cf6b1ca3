"""Hyperparameter search with Keras Tuner.

The tuner's project folder is named after the data fingerprint and the budget, and opened with
`overwrite=False`: running the same search again resumes it (or finds it finished) instead of
starting over.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt

from training.data import Splits
from training.hypermodel import EnsembleHyperModel

TUNERS = ("hyperband",)


@dataclass(frozen=True)
class SearchBudget:
    """How much searching to do. Hyperband's cost grows with max_epochs * log(max_epochs)."""

    tuner: str = "hyperband"
    max_epochs: int = 9
    factor: int = 3
    objective: str = "val_accuracy"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.tuner not in TUNERS:
            raise ValueError(f"unknown tuner {self.tuner!r}: choose one of {', '.join(TUNERS)}")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if self.factor < 2:
            raise ValueError(f"the Hyperband factor must be at least 2, got {self.factor}")

    def key(self) -> str:
        """Short stable digest of the budget, part of the tuner's project name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


class _TrialProgress(keras.callbacks.Callback):
    """Reports one line per finished trial: the tuner itself only speaks in verbose mode."""

    def __init__(self, report: Callable[[str], None], objective: str):
        super().__init__()
        self.report = report
        self.objective = objective
        self.trials = 0

    def __deepcopy__(self, memo):
        # Keras Tuner deep-copies callbacks for every trial; one shared counter is the point.
        return self

    def on_train_end(self, logs=None):
        self.trials += 1
        value = (logs or {}).get(self.objective)
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        self.report(f"[tune] trial {self.trials} done: {self.objective}={shown}")


def search(
    hypermodel: EnsembleHyperModel,
    splits: Splits,
    budget: SearchBudget,
    directory: Path,
    project: str,
    seed: int,
    report: Callable[[str], None] = print,
    verbose: int = 0,
) -> list[kt.HyperParameters]:
    """Run (or resume) the search and return every configuration, best first."""
    tuner = kt.Hyperband(
        hypermodel,
        objective=budget.objective,
        max_epochs=budget.max_epochs,
        factor=budget.factor,
        hyperband_iterations=1,
        seed=seed,
        directory=str(directory),
        project_name=f"{project}-{budget.key()}",
        overwrite=False,
    )
    with warnings.catch_warnings():
        # Hyperband resumes promoted trials from checkpoints without their optimizer state,
        # on purpose; Keras warns about it on every promotion.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        tuner.search(
            splits.train.x,
            splits.train.y,
            validation_data=(splits.val.x, splits.val.y),
            batch_size=budget.batch_size,
            callbacks=[_TrialProgress(report, budget.objective)],
            verbose=verbose,
        )
    return tuner.get_best_hyperparameters(num_trials=len(tuner.oracle.trials) or 1)
