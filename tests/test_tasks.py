"""The combination rule of each task (contract.tasks), against values worked out by hand: what
the members' outputs for one head become, calibrated, with each row's uncertainty."""

from __future__ import annotations

import math

import numpy as np
import pytest

from contract import scores, tasks


def test_classification_is_the_pooled_tempered_mean_with_the_three_scores():
    members = np.array([[[0.9, 0.1], [0.5, 0.5]], [[0.2, 0.8], [0.2, 0.8]]], np.float32)
    weights = [0.25, 0.75]
    got = tasks.combine("classification", members, weights, 2.0)
    want = scores.served(members, weights, 2.0)
    np.testing.assert_allclose(got.value, want, rtol=1e-6)
    assert got.variance is None and tuple(got.scores) == tasks.TASK_SCORES["classification"]
    np.testing.assert_allclose(np.stack(list(got.scores.values()), axis=1), scores.uncertainty(want, members, weights))
    assert got.scores["mutual_information"][1] == pytest.approx(0.0, abs=1e-12)  # members agree on row 1
    assert got.scores["mutual_information"][0] > 0.05


def test_labels_average_each_label_and_score_its_two_outcomes():
    # two members, two labels: they agree on the first (0.5), disagree on the second (0.1 vs 0.9)
    members = np.array([[[0.5, 0.1], [0.5, 0.9]]])
    got = tasks.combine("multilabel", members, [0.5, 0.5])
    np.testing.assert_allclose(got.value, [[0.5, 0.5]])
    ln2 = math.log(2)
    np.testing.assert_allclose(got.scores["entropy"], [[ln2, ln2]])
    h01 = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    np.testing.assert_allclose(got.scores["expected_entropy"], [[ln2, h01]])
    np.testing.assert_allclose(got.scores["mutual_information"], [[0.0, ln2 - h01]], atol=1e-12)


def test_a_label_temperature_moves_the_probability_on_its_logit_and_one_changes_nothing():
    p = np.array([[0.8, 0.3]], np.float32)
    assert tasks.calibrate_labels(p, 1.0) is p
    got = tasks.calibrate_labels(p, [2.0, 0.5])
    logit = lambda q: math.log(q / (1 - q))  # noqa: E731
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    np.testing.assert_allclose(got, [[sigmoid(logit(0.8) / 2), sigmoid(logit(0.3) / 0.5)]], rtol=1e-5)
    assert got.dtype == np.float32
    # a member certain of a label (probability 1) stays finite
    assert np.isfinite(tasks.calibrate_labels(np.array([[1.0, 0.0]]), 3.0)).all()


def test_binary_is_one_label_with_a_scalar_temperature():
    members = np.array([[[0.9], [0.7]]])
    got = tasks.combine("binary", members, [0.5, 0.5], 1.0)
    np.testing.assert_allclose(got.value, [[0.8]])
    assert got.scores["entropy"].shape == (1, 1)


def test_regression_is_the_members_mixture_scaled():
    means = np.array([[[1.0], [3.0]]], np.float32)
    variances = np.array([[[0.5], [1.5]]], np.float32)
    got = tasks.combine("regression", means, [0.5, 0.5], 1.0, variances)
    np.testing.assert_allclose(got.value, [[2.0]])
    assert got.value.dtype == np.float32
    np.testing.assert_allclose(got.variance, [[2.0]])  # aleatoric 1.0 + epistemic 1.0
    np.testing.assert_allclose(got.scores["epistemic_std"], [[1.0]])
    np.testing.assert_allclose(got.scores["aleatoric_std"], [[1.0]])
    np.testing.assert_allclose(got.scores["std"], [[math.sqrt(2.0)]])
    scaled = tasks.combine("regression", means, [0.5, 0.5], 2.0, variances)
    np.testing.assert_allclose(scaled.variance, [[4.0]])
    np.testing.assert_allclose(scaled.scores["epistemic_std"], [[math.sqrt(2.0)]])


def test_regression_without_variances_is_the_spread_of_the_means_alone_and_weights_count():
    means = np.array([[[0.0, 10.0], [4.0, 10.0]]])
    got = tasks.regression(means, [0.75, 0.25])
    np.testing.assert_allclose(got.value, [[1.0, 10.0]])
    np.testing.assert_allclose(got.variance, [[0.75 * 1.0 + 0.25 * 9.0, 0.0]])
    np.testing.assert_allclose(got.scores["aleatoric_std"], [[0.0, 0.0]])


def test_an_interval_is_the_normal_quantile_times_std_either_side():
    got = tasks.regression(np.array([[[1.0], [3.0]]]), [0.5, 0.5])
    lower, upper = tasks.interval(got, 0.9)
    half = 1.6448536269514722 * 1.0
    np.testing.assert_allclose(lower, [[2.0 - half]])
    np.testing.assert_allclose(upper, [[2.0 + half]])
    assert tasks.z_of(0.5) == pytest.approx(0.6744897501960817)
    for level in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"^an interval's level must be between 0 and 1 \(exclusive\)"):
            tasks.z_of(level)
    with pytest.raises(ValueError, match=r"^only a regression answer has intervals$"):
        tasks.interval(tasks.labels(np.array([[[0.5]]]), [1.0]), 0.9)


def test_an_unknown_task_is_named():
    with pytest.raises(ValueError, match=r"^unknown task 'ranking'; the tasks are classification, binary, "
                                         r"multilabel, regression$"):
        tasks.combine("ranking", np.zeros((1, 1, 1)), [1.0])


def test_what_each_task_predicts_per_row():
    """The one rule every codec and the metrics read (contract.tasks.predicted_*): the top
    class, a binary head's label at 0.5 (exactly 0.5 is the positive one), every multi-label
    label at 0.5 or more, and nothing for regression."""
    value = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    assert tasks.predicted_columns("classification", value).tolist() == [[0, 1, 0], [1, 0, 0]]
    assert tasks.predicted_labels("classification", ("a", "b", "c"), value) == ["b", "a"]
    binary = np.array([[0.5], [0.49], [0.9]])
    assert tasks.predicted_columns("binary", binary).tolist() == [[0, 1], [1, 0], [0, 1]]
    assert tasks.predicted_labels("binary", ("no", "yes"), binary) == ["yes", "no", "yes"]
    assert tasks.predicted_columns("multilabel", value).tolist() == [[0, 1, 0], [1, 0, 0]]
    assert tasks.predicted_labels("multilabel", ("x", "y", "z"), np.array([[0.5, 0.7, 0.1], [0.0, 0.2, 0.4]])) == \
        [["x", "y"], []]
    assert tasks.predicted_columns("regression", value) is None
    assert tasks.predicted_labels("regression", ("p",), value) is None


def test_combine_head_splits_the_members_outputs_and_calibrates_as_the_manifest_says():
    from contract.manifest import HeadSpec

    rng = np.random.default_rng(5)
    gaussian = HeadSpec(name="y", task="regression", labels=("a", "b"), variance=True, variance_scale=1.5)
    outputs = np.concatenate([rng.normal(size=(4, 3, 2)), rng.uniform(0.1, 1, size=(4, 3, 2))], axis=2)
    got = tasks.combine_head(gaussian, outputs, [0.2, 0.3, 0.5])
    want = tasks.regression(outputs[:, :, :2], [0.2, 0.3, 0.5], 1.5, outputs[:, :, 2:])
    np.testing.assert_array_equal(got.value, want.value)
    np.testing.assert_array_equal(got.variance, want.variance)
    labels = HeadSpec(name="tags", task="multilabel", labels=("p", "q"), temperatures=(0.5, 2.0))
    probabilities = rng.uniform(0.05, 0.95, size=(4, 3, 2))
    np.testing.assert_array_equal(tasks.combine_head(labels, probabilities, [0.2, 0.3, 0.5]).value,
                                  tasks.labels(probabilities, [0.2, 0.3, 0.5], (0.5, 2.0)).value)
    plain = HeadSpec(name="kind", task="classification", labels=("x", "y", "z"))
    assert tasks.calibration_of(plain) == 1.0 and tasks.calibration_of(labels) == (0.5, 2.0)
    assert tasks.calibration_of(gaussian) == 1.5
