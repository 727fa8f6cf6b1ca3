"""Metrics and averaging as pure functions, on cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluate import (
    accuracy,
    average_probabilities,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    format_table,
    negative_log_likelihood,
)

PROBS = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
LABELS = np.array([0, 1, 1])


def test_accuracy_counts_argmax_hits():
    assert accuracy(PROBS, LABELS) == pytest.approx(2 / 3)


def test_nll_is_mean_negative_log_of_label_probability():
    assert negative_log_likelihood(PROBS, LABELS) == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.3)) / 3)


def test_nll_of_a_certain_mistake_is_large_but_finite():
    assert 15 < negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([1])) < 20


def test_brier_is_mean_squared_distance_to_one_hot():
    expected = ((0.1**2 + 0.1**2) + (0.4**2 + 0.4**2) + (0.7**2 + 0.7**2)) / 3
    assert brier_score(PROBS, LABELS) == pytest.approx(expected)


def test_ece_of_hand_worked_bins():
    # Confidences 0.9 (bin 14, right), 0.6 (bin 9, right), 0.7 (bin 10, wrong), one row each.
    expected = (abs(0.9 - 1) + abs(0.6 - 1) + abs(0.7 - 0)) / 3
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected)


def test_ece_is_zero_when_confidence_equals_accuracy():
    probs = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_average_probabilities_weighted_and_plain():
    a = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(average_probabilities(a, [0.5, 0.5]), [[0.5, 0.5]])
    np.testing.assert_allclose(average_probabilities(a, [0.75, 0.25]), [[0.75, 0.25]])


@pytest.mark.parametrize("weights", [[0.5, 0.6], [1.5, -0.5], [1.0]])
def test_average_probabilities_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        average_probabilities(np.ones((2, 1, 2)) / 2, weights)


def test_classification_metrics_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="rows"):
        classification_metrics(PROBS, np.array([0, 1]))


def test_format_table_has_a_row_per_entry():
    table = format_table({"m": classification_metrics(PROBS, LABELS), "ENSEMBLE": classification_metrics(PROBS, LABELS)})
    lines = table.splitlines()
    assert lines[0].split() == ["member", "accuracy", "nll", "brier", "ece"]
    assert lines[2].startswith("ENSEMBLE") and "0.6667" in lines[2]
