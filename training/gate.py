"""The publish gate: a challenger is published only if it is not worse than the current version
on the same held-out rows, by a chosen metric and tolerance, and not shown to be worse than the
member a user would deploy instead (chosen on validation): refused when the bootstrap 95%
interval of that difference lies entirely on the worse side, beyond the tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from contract.manifest import Manifest, read_manifest
from contract.scores import served
from training.compare import Difference
from training.evaluate import HIGHER_IS_BETTER, classification_metrics
from training.publish import latest_committed


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    metric: str
    tolerance: float
    challenger: float
    champion: float | None
    champion_version: int | None
    reason: str


def classification_direction(metric: str) -> bool:
    """Whether more is better for a classification metric (accuracy: yes; nll, brier, ece: no)."""
    return HIGHER_IS_BETTER[metric]


def judge(metric: str, challenger: float, champion: float, tolerance: float,
          higher_is_better: Callable[[str], bool] = classification_direction) -> bool:
    """Not worse than the champion by more than `tolerance`, in the metric's own direction."""
    if higher_is_better(metric):
        return challenger >= champion - tolerance
    return challenger <= champion + tolerance


def champion_on(repository: Path, name: str, x: np.ndarray, labels: np.ndarray,
                shape: tuple[int, ...], classes: tuple[str, ...]) -> tuple[Manifest, dict] | None:
    """The newest published version of `name` and its metrics on these rows, if it is comparable
    (same input shape and class labels); None when there is nothing to compare with."""
    from training.members import predict_saved_model

    version = latest_committed(repository, name)
    if version is None:
        return None
    vdir = repository / name / str(version)
    manifest = read_manifest(vdir)
    if manifest.format_version != 1:  # named inputs and heads: not this run's kind of ensemble
        return None
    if manifest.input.shape != tuple(shape) or manifest.output.classes != tuple(classes):
        return None
    probs = np.stack([predict_saved_model(vdir / m.path, x) for m in manifest.members], axis=1)
    return manifest, classification_metrics(served(probs, manifest.weights, manifest.temperature), labels)


def shown_worse(difference: Difference, tolerance: float,
                higher_is_better: Callable[[str], bool] = classification_direction) -> bool:
    """Whether the whole 95% interval of ensemble minus member is worse than `tolerance`."""
    if higher_is_better(difference.metric):
        return difference.high < -tolerance
    return difference.low > tolerance


def decide(challenger: dict, champion: tuple[Manifest, dict] | None, metric: str,
           tolerance: float, versus_member: Difference | None = None, member: str = "",
           higher_is_better: Callable[[str], bool] = classification_direction) -> GateDecision:
    """The gate's verdict and a sentence a person can read (`higher_is_better`: the direction of
    each metric of the head's task)."""
    ours = challenger[metric]
    if versus_member is not None and shown_worse(versus_member, tolerance, higher_is_better):
        return GateDecision(False, metric, tolerance, ours, None, None,
                            f"challenger is refused: worse than {member}, the member chosen on validation, "
                            f"on the test rows: {versus_member.sentence()}")
    if champion is None:
        return GateDecision(True, metric, tolerance, ours, None, None,
                            "no comparable published version: the first one passes")
    manifest, theirs = champion
    passed = judge(metric, ours, theirs[metric], tolerance, higher_is_better)
    verb = "passes" if passed else "is refused"
    return GateDecision(passed, metric, tolerance, ours, theirs[metric], manifest.version,
                        f"challenger {verb}: {metric} {ours:.4f} vs version {manifest.version}'s "
                        f"{theirs[metric]:.4f} on the same test rows (tolerance {tolerance:g})")
