"""Cross-fitted members for small tables: every development row (training and validation) gets
an out-of-fold prediction, and the ensemble is chosen and calibrated on all of them.

With a few hundred rows, a 15% validation split is a few dozen rows: too few to tell members
apart, fit weights or a temperature, and the ensemble then loses to the member a user would have
picked (issue 28's measurements on wine and breast cancer). Cross-fitting uses every row
instead: each member's run is trained K times, fold k held out (and used for its early
stopping); each development row is predicted by the one model that did not train on it. The
selection, weights and calibration are fitted on those out-of-fold predictions; the published
member is its K fold models, each with a K-th of its weight.

Two approximations, both on the side of the fitting rows: fold k is both a fold model's
early-stopping set and the rows its out-of-fold predictions are scored on (as a validation split
is), and the calibration is fitted on single fold models' outputs while the server averages all
K of them (softer probabilities, and the folds' spread in a regression variance). The test
figures are not approximated: what the assessment judges on the test split is what the server
serves: a member's test output is the average of its fold models' outputs, which, weighted and averaged again over members, is
exactly the served average over every fold model; for a Gaussian regression head its variance
is the fold models' mixture variance (their mean variance plus the spread of their means), so
the ensemble's mixture variance is exactly the served one too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Below this many development rows (training + validation) a table's members are cross-fitted:
# it lowered the test NLL on wine's half-splits (89 development rows) and on diabetes (353),
# not on breast cancer's half-splits (285), at four to five times the member training
# (benchmarks/RESULTS.md, issue 28).
SMALL_ROWS = 1000
FOLDS = 5


def folds_of(target: np.ndarray, task: str, k: int, seed: int) -> list[np.ndarray]:
    """K disjoint sorted row index arrays covering every row, stratified by class for
    classification and binary (scikit-learn's StratifiedKFold), shuffled KFold otherwise."""
    from sklearn.model_selection import KFold, StratifiedKFold

    rows = np.arange(len(target))
    if task in ("classification", "binary"):
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(rows, np.asarray(target))
    else:
        parts = KFold(n_splits=k, shuffle=True, random_state=seed).split(rows)
    return [np.sort(held) for _, held in parts]


def out_of_fold(fold_outputs: list[np.ndarray], folds: list[np.ndarray], rows: int) -> np.ndarray:
    """One member's outputs on every development row, (rows, c), each from the fold model that
    held that row out (`fold_outputs[k]`: the fold-k model's outputs on `folds[k]`'s rows)."""
    columns = fold_outputs[0].shape[1]
    out = np.full((rows, columns), np.nan, dtype=np.float64)
    for held, values in zip(folds, fold_outputs):
        out[held] = values
    if np.isnan(out).any():
        raise ValueError("the folds do not cover every development row")
    return out


def fold_average(outputs: list[np.ndarray], task: str, variance: bool) -> np.ndarray:
    """A member's output on other rows as the average of its K fold models, (rows, c): their
    mean (probabilities, or a regression head's means) and, for a Gaussian head, their mixture
    variance (the mean of the variances plus the spread of the means) after the means."""
    stacked = np.stack([np.asarray(o, dtype=np.float64) for o in outputs])  # (K, rows, c)
    if not (task == "regression" and variance):
        return stacked.mean(axis=0)
    k = stacked.shape[2] // 2
    means, variances = stacked[..., :k], stacked[..., k:]
    mean = means.mean(axis=0)
    return np.concatenate([mean, variances.mean(axis=0) + ((means - mean) ** 2).mean(axis=0)], axis=-1)


@dataclass(frozen=True)
class MemberModel:
    """One published model of a member (`member`: the member's name): its one model when trained
    once, or one of its fold models (`fold`) when cross-fitted."""

    member: str
    fold: int
    name: str
    kind: str
    export_dir: object
    hyperparameters: dict


def fold_name(member: str, fold: int) -> str:
    """The published name of a member's fold model."""
    return f"{member}-fold{fold}"


@dataclass(frozen=True)
class CrossFitted:
    """What cross-fitting made: the members by name and kind, their out-of-fold outputs on the
    development rows (members, rows, c), their fold-averaged outputs on the test rows, and every
    fold model to publish."""

    names: list[str]
    kinds: dict[str, str]
    hyperparameters: dict[str, dict]
    val: np.ndarray
    test: np.ndarray
    fold_models: list[MemberModel]
    fold_test: list[np.ndarray]  # each fold model's own test outputs, in fold_models' order

    def published(self, weights: dict[str, float]) -> list[tuple[MemberModel, float]]:
        """Every fold model of the kept members (`weights`: member name -> its weight), with a
        K-th of its member's weight."""
        counts = {n: sum(f.member == n for f in self.fold_models) for n in weights}
        chosen = [f for f in self.fold_models if f.member in weights]
        chosen.sort(key=lambda f: (self.names.index(f.member), f.fold))  # a member's folds together
        return [(f, weights[f.member] / counts[f.member]) for f in chosen]

    def served_test(self, weights: dict[str, float]) -> tuple[np.ndarray, list[float]]:
        """(the kept fold models' test outputs (models, rows, c), their weights): what the server
        combines for the test rows."""
        chosen = self.published(weights)
        index = {id(f): i for i, f in enumerate(self.fold_models)}
        return np.stack([self.fold_test[index[id(f)]] for f, _ in chosen]), [w for _, w in chosen]


def train_cross_fitted(runs, make_trainer, folds: list[np.ndarray], predict, task: str, variance: bool,
                       report, begin=lambda index: "") -> CrossFitted:
    """Train every run of the plan once per fold (`make_trainer(k)`: a MemberTrainer fitting on
    the other folds and stopping early on fold k) and gather each member's out-of-fold and
    fold-averaged test outputs (`predict(export_dir, k)`: (outputs on fold k's rows, outputs on
    the test rows)). `begin(i)` says where the i-th of all the fits stands (the progress
    display's `MemberPhase.begin`)."""
    from training.pipeline import run_key

    rows = int(sum(len(f) for f in folds))
    per_member: dict[str, list] = {}
    kinds: dict[str, str] = {}
    hyperparameters: dict[str, dict] = {}
    fold_models: list[MemberModel] = []
    fold_test: list[np.ndarray] = []
    for k in range(len(folds)):
        trainer = make_trainer(k)
        for i, run in enumerate(runs, 1):
            report(f"[member] fold {k + 1} of {len(folds)}, run {i} of {len(runs)} (fit "
                   f"{k * len(runs) + i}{begin(k * len(runs) + i)}): {run.kind} -> {', '.join(run.names)}")
            for trained in trainer.train_run(run, f"{run_key(run)}-fold{k}"):
                member = trained.name
                held, test = predict(trained.export_dir, k)
                per_member.setdefault(member, []).append((held, test))
                kinds[member] = trained.kind
                hyperparameters[member] = trained.hyperparameters
                fold_models.append(MemberModel(member, k, fold_name(member, k), trained.kind, trained.export_dir,
                                              {**trained.hyperparameters, "fold": k, "folds": len(folds)}))
                fold_test.append(test)
    names = list(per_member)
    val = np.stack([out_of_fold([held for held, _ in per_member[n]], folds, rows) for n in names])
    test = np.stack([fold_average([t for _, t in per_member[n]], task, variance) for n in names])
    return CrossFitted(names, kinds, hyperparameters, val, test, fold_models, fold_test)


def concat_tables(first, second):
    """The rows of two splits of one table as one (`training.tables.Table`): the development
    rows that cross-fitting folds."""
    from dataclasses import replace

    return replace(first, columns={c: np.concatenate([v, second.columns[c]]) for c, v in first.columns.items()},
                   target=np.concatenate([first.target, second.target]))

