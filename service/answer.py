"""What an ensemble answers for a request's rows, typed: per head, the combined value, each
member's value, the uncertainty scores by name and where the rows abstain.

An engine computes a version as a tuple of arrays, rows first, in an order of its own (a
format-2 version's are combined per head by `combine`, once per batch, on the inference
thread); the batcher moves those arrays without knowing what they mean; `Answer.of` is the one
place that names them. Everything after it (the protocol codecs, the metrics) reads an `Answer`, so a new
output or a new task is added here and in the codecs that show it, not in every layer.

Pure NumPy: no engine, no protocol, no transport.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from contract import tasks
from contract.manifest import TASK_SCORES, HeadSpec, Manifest, ManifestV2
from contract.scores import SCORES

# The columns of a format-1 engine's scores array: contract.scores' three, then 1.0 where the
# row is above the version's abstention threshold (0.0 everywhere for a version without one).
SCORE_COLUMNS = (*SCORES, "abstain")
_ABSTAIN = SCORE_COLUMNS.index("abstain")


class ScoreColumns(Mapping):
    """A format-1 engine's scores array (rows, len(SCORE_COLUMNS)) read by score name, one
    column at a time: nothing is copied for the requests that never ask for the scores."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array[:, SCORES.index(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(SCORES)

    def __len__(self) -> int:
        return len(SCORES)


@dataclass(eq=False, slots=True)  # not frozen: built for every request, and a frozen init costs more
class Head:
    """One output of the ensemble for a request's rows.

    `combined` is the ensemble's value (rows, k): the classes' calibrated probabilities, the
    labels' probabilities of "yes", or the targets' means; `members` each member's (rows,
    members, k); `labels` name the k columns; `scores` the task's uncertainty scores by name
    (contract.tasks: (rows,) for classification, (rows, k) otherwise); `abstained` (rows,), where
    above 0 the row abstains, for a head with an abstention rule, else None (a format-1 engine's
    abstain column, read only when asked); `variance` (rows, k), the total variance of a
    regression head."""

    name: str
    task: str
    labels: tuple[str, ...]
    combined: np.ndarray
    members: np.ndarray
    scores: Mapping[str, np.ndarray]
    abstained: np.ndarray | None = None
    variance: np.ndarray | None = None

    def score(self, name: str) -> np.ndarray:
        """The uncertainty score `name` of every row, contiguous."""
        return np.ascontiguousarray(self.scores[name])

    def scores_by_name(self) -> dict[str, np.ndarray]:
        """{score name: its values}, each contiguous."""
        return {name: self.score(name) for name in self.scores}

    def abstain(self) -> np.ndarray | None:
        """Whether each row abstains (rows,) bool; None for a head without an abstention rule."""
        return self.abstained > 0 if self.abstained is not None else None

    def top_labels(self) -> list[str]:
        """The most probable label of every row (classification)."""
        return [self.labels[i] for i in self.combined.argmax(axis=1).tolist()]

    def members_by_name(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """{member name: (rows, k)}, each contiguous."""
        return dict(zip(names, np.ascontiguousarray(self.members.transpose(1, 0, 2))))

    def disagreement(self) -> np.ndarray:
        """Per row: the share of members whose top label differs from the ensemble's."""
        return disagreement(self.members, self.combined)

    def interval(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) (rows, k) of a regression head's central interval at `level`."""
        return tasks.interval(tasks.Combined(self.combined, self.variance, dict(self.scores)), level)


@dataclass(eq=False, slots=True)
class Answer:
    """The ensemble's answer for a request's rows: which version answered, its members' names,
    and its heads by name (a format-1 version has one, `probabilities`)."""

    name: str
    version: int
    member_names: tuple[str, ...]
    heads: dict[str, Head]
    format_version: int = 1

    @property
    def rows(self) -> int:
        return len(next(iter(self.heads.values())).combined)

    @property
    def head(self) -> Head:
        """The first head: the only one of a format-1 version."""
        return next(iter(self.heads.values()))

    @classmethod
    def of(cls, manifest: Manifest | ManifestV2, outputs: Sequence[np.ndarray],
           member_names: tuple[str, ...]) -> "Answer":
        """The answer in a batch's outputs (or some rows of them) for the version of `manifest`,
        whose members are `member_names` (passed in: worked out once per version, not per request).

        Format 1: (combined (rows, k), members (rows, members, k), scores (rows,
        len(SCORE_COLUMNS))), combined in the engine's graph. Format 2: `combine`'s arrays."""
        if manifest.format_version == 1:
            combined, members, scores = outputs
            head = Head("probabilities", "classification", manifest.output.classes, combined, members,
                        ScoreColumns(scores), scores[:, _ABSTAIN] if manifest.abstention is not None else None)
            return cls(manifest.name, manifest.version, member_names, {head.name: head})
        arrays, heads = iter(outputs), {}
        for spec in manifest.heads:
            value, members = next(arrays), next(arrays)
            variance = next(arrays) if spec.task == "regression" else None
            scores = {score: next(arrays) for score in TASK_SCORES[spec.task]}
            abstained = next(arrays) if spec.abstention is not None else None
            heads[spec.name] = Head(spec.name, spec.task, spec.labels, value, members, scores, abstained, variance)
        return cls(manifest.name, manifest.version, member_names, heads, 2)


def combine(manifest: ManifestV2, outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """A format-2 engine's outputs for a batch (per head in the manifest's order: the members'
    values (rows, members, k), then a Gaussian head's variances) combined per head by its task
    (`combined_head`), as the arrays `Answer.of` reads, every one rows first. Per head: its
    value, the members' values, a regression head's variance, its task's scores (in
    contract.manifest.TASK_SCORES's order), and for a head with an abstention rule where it
    abstains. Run once per batch (the batcher then hands each request its rows of each), so a
    request's answer costs no arithmetic."""
    arrays, out = list(outputs), []
    for spec in manifest.heads:
        members = arrays.pop(0)
        variances = arrays.pop(0) if spec.variance else None
        head = combined_head(spec, members, variances, manifest.weights)
        out += [head.combined, head.members]
        if spec.task == "regression":
            out.append(head.variance)
        out += [head.scores[score] for score in TASK_SCORES[spec.task]]
        if spec.abstention is not None:
            out.append(head.abstained)
    return tuple(out)


def combined_head(spec: HeadSpec, members: np.ndarray, variances: np.ndarray | None,
                  weights: Sequence[float]) -> Head:
    """A format-2 head: the members' values combined by the head's task, calibrated as its
    manifest says, with its abstention rule applied."""
    result = tasks.combine(spec.task, members, weights, tasks.calibration_of(spec), variances)
    abstained = None
    rule = spec.abstention
    if rule is not None:
        if rule.score == "interval_width":
            lower, upper = tasks.interval(result, rule.level)
            width = upper - lower
        else:
            width = result.scores[rule.score]
        width = width if width.ndim == 1 else width.max(axis=1)
        abstained = width > rule.threshold
    return Head(spec.name, spec.task, spec.labels, result.value, members, result.scores, abstained, result.variance)


def disagreement(member_probabilities: np.ndarray, ensemble_probabilities: np.ndarray) -> np.ndarray:
    """Per row: share of members whose argmax differs from the ensemble's. (rows, members, k) -> (rows,)"""
    ensemble_top = np.argmax(ensemble_probabilities, axis=-1)[:, None]
    return np.mean(np.argmax(member_probabilities, axis=-1) != ensemble_top, axis=1)
