"""What an ensemble answers for a request's rows, typed: per head, the combined value, each
member's value, the uncertainty scores by name and where the rows abstain.

An engine computes a version as a tuple of arrays, rows first, in an order of its own; the
batcher moves those arrays without knowing what they mean; `Answer.of` is the one place that
names them. Everything after it (the protocol codecs, the metrics) reads an `Answer`, so a new
output or a new task is added here and in the codecs that show it, not in every layer.

Pure NumPy: no engine, no protocol, no transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from contract.manifest import Manifest
from contract.scores import SCORES

# The columns of an engine's scores array: contract.scores' three, then 1.0 where the row is
# above the version's abstention threshold (0.0 everywhere for a version without one).
SCORE_COLUMNS = (*SCORES, "abstain")
_ABSTAIN = SCORE_COLUMNS.index("abstain")


@dataclass(frozen=True, eq=False)
class Head:
    """One output of the ensemble for a request's rows.

    `combined` is the ensemble's value (rows, k): for classification the pooled, calibrated
    probabilities; `members` each member's (rows, members, k); `labels` name the k columns;
    `scores` holds the uncertainty scores (rows, len(SCORE_COLUMNS)) in SCORE_COLUMNS' order,
    read by name with `score`; `abstains` says whether the version has an abstention rule."""

    name: str
    task: str
    labels: tuple[str, ...]
    combined: np.ndarray
    members: np.ndarray
    scores: np.ndarray
    abstains: bool

    def score(self, name: str) -> np.ndarray:
        """The uncertainty score `name` (one of contract.scores.SCORES) of every row, contiguous."""
        return np.ascontiguousarray(self.scores[:, SCORES.index(name)])

    def scores_by_name(self) -> dict[str, np.ndarray]:
        """{score name: (rows,)} for every score of contract.scores, each contiguous."""
        return dict(zip(SCORES, np.ascontiguousarray(self.scores[:, :len(SCORES)].T)))

    def abstain(self) -> np.ndarray | None:
        """Whether each row abstains (rows,) bool; None for a version without an abstention rule."""
        return self.scores[:, _ABSTAIN] > 0 if self.abstains else None

    def top_labels(self) -> list[str]:
        """The most probable label of every row (classification)."""
        return [self.labels[i] for i in self.combined.argmax(axis=1).tolist()]

    def members_by_name(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """{member name: (rows, k)}, each contiguous."""
        return dict(zip(names, np.ascontiguousarray(self.members.transpose(1, 0, 2))))

    def disagreement(self) -> np.ndarray:
        """Per row: the share of members whose top label differs from the ensemble's."""
        return disagreement(self.members, self.combined)


@dataclass(frozen=True, eq=False)
class Answer:
    """The ensemble's answer for a request's rows: which version answered, its members' names,
    and its heads by name (a format-1 version has one, `probabilities`)."""

    name: str
    version: int
    member_names: tuple[str, ...]
    heads: dict[str, Head]

    @property
    def rows(self) -> int:
        return len(next(iter(self.heads.values())).combined)

    @property
    def head(self) -> Head:
        """The first head: the only one of a format-1 version."""
        return next(iter(self.heads.values()))

    @classmethod
    def of(cls, manifest: Manifest, outputs: Sequence[np.ndarray], member_names: tuple[str, ...]) -> "Answer":
        """The answer in an engine's outputs (combined (rows, k), members (rows, members, k),
        scores (rows, len(SCORE_COLUMNS))) for the version of `manifest`, whose members are
        `member_names` (passed in: worked out once per version, not per request)."""
        combined, members, scores = outputs
        head = Head("probabilities", "classification", manifest.output.classes, combined, members, scores,
                    manifest.abstention is not None)
        return cls(manifest.name, manifest.version, member_names, {head.name: head})


def disagreement(member_probabilities: np.ndarray, ensemble_probabilities: np.ndarray) -> np.ndarray:
    """Per row: share of members whose argmax differs from the ensemble's. (rows, members, k) -> (rows,)"""
    ensemble_top = np.argmax(ensemble_probabilities, axis=-1)[:, None]
    return np.mean(np.argmax(member_probabilities, axis=-1) != ensemble_top, axis=1)
