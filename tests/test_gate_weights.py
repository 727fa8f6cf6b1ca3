"""The publish gate's verdicts and the validation-fitted averaging weights (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from training.gate import decide, judge
from training.weighting import fit_weights, floor_and_normalise


@pytest.mark.parametrize(
    "metric, challenger, champion, tolerance, passed",
    [
        ("accuracy", 0.95, 0.95, 0.0, True),
        ("accuracy", 0.94, 0.95, 0.0, False),
        ("accuracy", 0.94, 0.95, 0.02, True),
        ("nll", 0.10, 0.12, 0.0, True),
        ("nll", 0.13, 0.12, 0.0, False),
        ("nll", 0.13, 0.12, 0.05, True),
        ("ece", 0.02, 0.01, 0.0, False),
    ],
)
def test_judge_respects_each_metrics_direction(metric, challenger, champion, tolerance, passed):
    assert judge(metric, challenger, champion, tolerance) is passed


def test_decide_reports_both_figures():
    class Manifest:
        version = 4

    refused = decide({"accuracy": 0.90}, (Manifest(), {"accuracy": 0.95}), "accuracy", 0.0)
    assert not refused.passed and (refused.challenger, refused.champion, refused.champion_version) == (0.90, 0.95, 4)
    assert "0.9000 vs version 4's 0.9500" in refused.reason
    first = decide({"accuracy": 0.5}, None, "accuracy", 0.0)
    assert first.passed and "no comparable" in first.reason


def test_fitted_weights_favour_the_better_member():
    labels = np.arange(200) % 2
    good = np.eye(2)[labels] * 0.9 + 0.05
    noise = np.full((200, 2), 0.5)
    weights = fit_weights(np.stack([noise, good]), labels)
    assert weights[1] > 0.9 and sum(weights) == pytest.approx(1.0, abs=1e-12)


def test_floor_and_normalise_keeps_every_member_and_sums_to_one():
    w = floor_and_normalise(np.array([1.0, 0.0, 0.0]))
    assert min(w) > 0 and sum(w) == 1.0
