"""One head of any task judged on synthetic members whose properties are known: selection,
calibration, metrics, the comparison, abstention, and that what is measured is what the server
serves (contract.tasks.combine, service.answer.combined_head). Pure NumPy, no models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, r2_score

from contract import tasks
from contract.manifest import HeadSpec
from service.answer import combined_head
from training.assess import Probabilities, assess
from training.calibration import fit_label_temperatures, fit_variance_scale
from training.abstention import fit_rms_threshold
from training.head_assess import ABSTAIN_LEVEL, assess_head, measure_answer, member_outputs
from training.task_metrics import HeadDifference, Judged, head_metrics, interval_width, label_calibration_error

ROWS = 500


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _regression(rng, members=4, rows=2 * ROWS, noise=1.0, member_noise=0.3, stated_variance=0.1, worse=None):
    """Gaussian members of y = 2x + noise: each mean off by its own noise, each stating a
    variance far below the true one (over-confident); `worse` {member: factor} are noisier."""
    x = rng.normal(size=rows)
    y = (2 * x + rng.normal(size=rows) * noise)[:, None]
    spreads = [member_noise * (worse or {}).get(m, 1) for m in range(members)]
    means = np.stack([2 * x + rng.normal(size=rows) * s for s in spreads])[..., None]
    return np.concatenate([means, np.full_like(means, stated_variance)], axis=2), y


def _labels(rng, members=4, rows=2 * ROWS, k=3, sharpness=2.0, member_noise=1.0):
    """Members of true label logits plus their own noise, scaled by `sharpness` (above 1:
    over-confident); labels drawn from the truth."""
    truth = rng.normal(size=(rows, k)) * 1.5
    y = (rng.random((rows, k)) < _sigmoid(truth)).astype(np.int64)
    probs = np.stack([_sigmoid((truth + rng.normal(size=truth.shape) * member_noise) * sharpness)
                      for _ in range(members)])
    return probs, y


def _softmax_members(rng, members=4, rows=2 * ROWS, classes=4, bad=()):
    truth = rng.normal(size=(rows, classes)) * 3
    p = np.exp(truth) / np.exp(truth).sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=q) for q in p])
    logits = np.stack([truth + rng.normal(size=truth.shape) * (12 if m in bad else 3) for m in range(members)])
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), labels


def _split(raw, y):
    return raw[:, :ROWS], raw[:, ROWS:], y[:ROWS], y[ROWS:]


NAMES = ["m0", "m1", "m2", "m3"]


# -- calibration --------------------------------------------------------------------------------

def test_regression_members_stating_too_small_a_variance_get_a_scale_above_one_and_honest_coverage():
    raw, y = _regression(np.random.default_rng(0))
    found = assess_head("regression", NAMES, *_split(raw, y), variance=True, weighting="uniform", calibrate=True,
                        target_error=None, seed=0)
    assert found.selection.calibration[0] > 2.0
    assert found.uncalibrated["coverage_90"] < 0.75
    assert found.ensemble["coverage_90"] == pytest.approx(0.9, abs=0.04)
    assert found.ensemble["nll"] < found.uncalibrated["nll"]


def test_the_variance_scale_is_the_closed_form_when_the_prior_and_floor_do_not_bind():
    rng = np.random.default_rng(1)
    mean, variance = rng.normal(size=(4000, 2)), rng.uniform(0.5, 2.0, size=(4000, 2))
    target = mean + rng.normal(size=(4000, 2)) * np.sqrt(3.0 * variance)
    closed = float(np.mean((target - mean) ** 2 / variance))
    assert fit_variance_scale(mean, variance, target, np.full(2, 1e-12)) == pytest.approx(closed, rel=0.01)
    assert closed == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize("sharpness, direction", [(3.0, 1), (0.4, -1)])
def test_a_label_temperature_softens_overconfident_members_and_sharpens_underconfident_ones(sharpness, direction):
    probs, y = _labels(np.random.default_rng(2), k=1, sharpness=sharpness, member_noise=0.2)
    found = assess_head("binary", NAMES, *_split(probs, y[:, 0]), weighting="uniform", calibrate=True,
                        target_error=None, seed=0)
    (t,) = found.selection.calibration
    assert np.sign(np.log(t)) == direction and abs(np.log(t)) > 0.3
    assert found.ensemble["nll"] < found.uncalibrated["nll"]


def test_each_label_gets_its_own_temperature():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(3000, 2)) * 1.5
    y = (rng.random(truth.shape) < _sigmoid(truth)).astype(np.int64)
    p = _sigmoid(truth * np.array([3.0, 1 / 3.0]))  # label 0 over-confident, label 1 under
    t0, t1 = fit_label_temperatures(p, y)
    assert t0 == pytest.approx(3.0, rel=0.1) and t1 == pytest.approx(1 / 3.0, rel=0.1)


# -- selection ----------------------------------------------------------------------------------

def test_a_much_worse_member_is_pruned_and_the_others_kept():
    raw, y = _regression(np.random.default_rng(4), worse={2: 8})
    found = assess_head("regression", NAMES, *_split(raw, y), variance=True, weighting="pruned", calibrate=True,
                        target_error=None, seed=0)
    assert found.kept == ["m0", "m1", "m3"]
    assert [r.member for r in found.selection.removed] == ["m2"]
    assert found.selection.removed[0].high < 0
    assert found.weight_of("m2") == 0.0 and sum(found.weights) == pytest.approx(1.0)


def test_pruning_never_goes_below_min_members():
    raw, y = _regression(np.random.default_rng(5), members=3, worse={1: 4, 2: 12})  # each worse than the last
    args = ("regression", NAMES[:3], *_split(raw, y))
    one = assess_head(*args, variance=True, weighting="pruned", target_error=None, seed=0, min_members=1)
    two = assess_head(*args, variance=True, weighting="pruned", target_error=None, seed=0, min_members=2)
    many = assess_head(*args, variance=True, weighting="pruned", target_error=None, seed=0, min_members=5)
    assert one.kept == ["m0"]
    assert len(two.kept) == 2 and "m0" in two.kept
    assert many.kept == NAMES[:3] and not many.selection.removed


def test_fitted_weights_favour_the_better_labels_member():
    probs, y = _labels(np.random.default_rng(7), members=2, sharpness=1.0, member_noise=0.3)
    noisy, _ = _labels(np.random.default_rng(8), members=1, sharpness=1.0, member_noise=3.0)
    both = np.concatenate([probs[:1], noisy])
    found = assess_head("multilabel", ["good", "noisy"], *_split(both, y), weighting="fitted", target_error=None,
                        seed=0)
    assert found.weight_of("good") > 0.8 and found.weight_of("noisy") >= 1e-3


# -- metrics ------------------------------------------------------------------------------------

def test_multilabel_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(9)
    p, y = rng.random((300, 5)), (rng.random((300, 5)) < 0.3).astype(np.int64)
    y[:, 4] = 0
    p[:, 4] = 0.1  # a label never present and never predicted: F1 0 (scikit-learn's default)
    got = head_metrics("multilabel", Judged(p, None, y.astype(float)))
    predicted = (p >= 0.5).astype(np.int64)
    assert got["micro_f1"] == pytest.approx(f1_score(y, predicted, average="micro"))
    with pytest.warns(Warning):  # scikit-learn warns about the empty label, and scores it 0
        macro = f1_score(y, predicted, average="macro")
    assert got["macro_f1"] == pytest.approx(macro)
    assert got["hamming_loss"] == pytest.approx(hamming_loss(y, predicted))
    assert got["accuracy"] == pytest.approx(accuracy_score(y, predicted))
    nll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert got["nll"] == pytest.approx(nll.sum(1).mean())
    assert got["nll_label_2"] == pytest.approx(nll[:, 2].mean())
    assert got["brier"] == pytest.approx(((p - y) ** 2).mean())


def test_binary_f1_is_the_positive_labels():
    rng = np.random.default_rng(10)
    p, y = rng.random((200, 1)), (rng.random(200) < 0.4).astype(np.int64)
    got = head_metrics("binary", Judged(p, None, y[:, None].astype(float)))
    assert got["f1"] == pytest.approx(f1_score(y, (p[:, 0] >= 0.5).astype(int)))
    assert got["accuracy"] == pytest.approx(np.mean((p[:, 0] >= 0.5) == y))


def test_label_ece_by_hand():
    # label 0: 0.9, 0.9 (bin 14, one yes: gap 0.4) and 0.2 (bin 2, no: gap 0.2); label 1 exact
    p = np.array([[0.9, 0.5], [0.9, 0.5], [0.2, 0.5]])
    y = np.array([[1, 1], [0, 0], [0, 1]])
    gaps0 = (2 * abs(0.9 - 0.5) + abs(0.2 - 0.0)) / 3
    gaps1 = abs(0.5 - 2 / 3)
    assert label_calibration_error(p, y) == pytest.approx((gaps0 + gaps1) / 2)


def test_regression_metrics_agree_with_scikit_learn_and_the_interval():
    rng = np.random.default_rng(11)
    mean, y = rng.normal(size=(400, 3)), rng.normal(size=(400, 3)) * [1.0, 2.0, 0.5]
    y[:, 2] = 0.25  # a constant target, not predicted exactly: scikit-learn scores it 0
    variance = np.full_like(mean, 1.5)
    got = head_metrics("regression", Judged(mean, variance, y, np.full(3, 1e-12)))
    assert got["r2"] == pytest.approx(r2_score(y, mean))
    assert got["rmse"] == pytest.approx(np.sqrt(((y - mean) ** 2).mean(0)).mean())
    assert got["mae"] == pytest.approx(np.abs(y - mean).mean())
    half = 1.6448536 * np.sqrt(1.5)
    assert got["width_90"] == pytest.approx(2 * half)
    assert got["coverage_90"] == pytest.approx(np.mean(np.abs(y - mean) <= half))
    nll = 0.5 * (np.log(2 * np.pi * 1.5) + (y - mean) ** 2 / 1.5)
    assert got["nll"] == pytest.approx(nll.sum(1).mean())


def test_a_member_without_a_variance_has_no_nll_or_coverage_and_is_picked_by_squared_error():
    raw, y = _regression(np.random.default_rng(12), worse={0: 3, 1: 3, 3: 3})
    found = assess_head("regression", NAMES, *_split(raw[..., :1], y), weighting="uniform", target_error=None,
                        seed=0)
    alone = found.member_metrics["m2"]
    assert np.isnan(alone["nll"]) and np.isnan(alone["coverage_90"]) and np.isfinite(alone["rmse"])
    assert found.selected == "m2"
    assert "nll" not in found.versus_selected and "rmse" in found.versus_selected
    assert np.isfinite(found.ensemble["nll"])
    json.dumps(found.summary(), allow_nan=False)  # NaN reported as null


def test_members_that_agree_exactly_are_reported_degenerate():
    raw, y = _regression(np.random.default_rng(13), members=2)
    same = np.repeat(raw[:1, :, :1], 2, axis=0)
    found = assess_head("regression", NAMES[:2], *_split(same, y), weighting="uniform", target_error=None, seed=0)
    assert found.degenerate == 1.0
    assert np.all(found.served.variance == 0.0)  # what is served: no floor
    assert np.isfinite(found.ensemble["nll"]) and found.ensemble["coverage_90"] < 0.05
    assert any("agree exactly" in line for line in found.describe())


def test_differences_read_each_metrics_direction():
    assert HeadDifference("rmse", 1.0, 2.0, -1.0, -1.5, -0.5).better
    assert not HeadDifference("r2", 0.5, 0.6, -0.1, -0.2, 0.0).better
    assert HeadDifference("nll_label_3", 1.0, 2.0, -1.0, -1.5, -0.5).better


# -- classification is format 1's assessment ----------------------------------------------------

@pytest.mark.parametrize("weighting", ["pruned", "fitted", "uniform"])
def test_classification_through_this_path_equals_the_format_1_assessment(weighting):
    probs, labels = _softmax_members(np.random.default_rng(14), bad={3})
    val, test, y_val, y_test = _split(probs, labels)
    old = assess(NAMES, Probabilities(val, test), y_val, y_test, weighting, True, 0.05, 0)
    new = assess_head("classification", NAMES, val, test, y_val, y_test, weighting=weighting, calibrate=True,
                      target_error=0.05, seed=0, min_members=1)
    assert new.kept == old.kept and new.weights == old.selection.weights
    assert new.selection.calibration == (old.selection.temperature,)
    assert new.selection.removed == old.selection.removed
    if weighting == "pruned":
        assert "m3" not in new.kept
    assert new.member_metrics == old.member_metrics
    assert new.uncalibrated == old.uncalibrated and new.ensemble == old.ensemble
    np.testing.assert_array_equal(new.served.value, old.ensemble_probabilities)
    assert new.selected == old.selected and new.versus_selected == old.versus_selected
    t = new.threshold
    assert (t.score, t.threshold, t.coverage, t.risk) == (old.threshold.score, old.threshold.threshold,
                                                          old.threshold.coverage, old.threshold.risk)
    assert new.test_abstention == old.test_abstention
    assert new.error_auroc == old.error_auroc and new.validation_scores == old.validation_scores


# -- what is served -----------------------------------------------------------------------------

def _cases():
    rng = np.random.default_rng(15)
    raw, y = _regression(rng)
    other, z = _regression(rng, member_noise=1.0, stated_variance=2.0)  # a second target, less certain
    two = np.concatenate([raw[..., :1], other[..., :1], raw[..., 1:], other[..., 1:]], axis=2)
    probs, labels = _labels(rng)
    softmax, classes = _softmax_members(rng)
    return [("regression", raw, y, True, ("y",), 0.6), ("regression", raw[..., :1], y, False, ("y",), 0.6),
            ("regression", two, np.concatenate([y, z], axis=1), True, ("y", "z"), 0.6),
            ("multilabel", probs, labels, False, ("a", "b", "c"), 0.3),
            ("binary", probs[..., :1], labels[:, 0], False, ("no", "yes"), 0.15),
            ("classification", softmax, classes, False, ("a", "b", "c", "d"), 0.1)]


@pytest.mark.parametrize("task, raw, y, variance, labels, target_error", _cases(),
                         ids=["gaussian", "means-only", "two-targets", "multilabel", "binary", "classification"])
def test_the_served_answer_is_contract_combine_and_the_servers_head(task, raw, y, variance, labels, target_error):
    found = assess_head(task, NAMES, *_split(raw, y), variance=variance, weighting="fitted", calibrate=True,
                        target_error=target_error, seed=0)
    test = raw[found.selection.kept, ROWS:]
    k = test.shape[2] // 2 if variance else test.shape[2]
    rows_first = test.transpose(1, 0, 2)
    means, variances = rows_first[..., :k], rows_first[..., k:] if variance else None
    calibration = found.selection.calibration if task in ("binary", "multilabel") else found.selection.calibration[0]
    want = tasks.combine(task, means, found.weights, calibration, variances)
    np.testing.assert_array_equal(found.served.value, want.value)
    if variance or task == "regression":
        np.testing.assert_array_equal(found.served.variance, want.variance)
    spec = HeadSpec.model_validate_json(found.head_spec("h", labels).model_dump_json())  # as published
    assert spec.abstention is not None  # each case answers some rows
    server = combined_head(spec, means, variances, found.weights)
    np.testing.assert_array_equal(server.combined, found.served.value)
    # a published version measured for the gate: its served answer, the same figures
    served = tasks.Combined(server.combined, server.variance, dict(server.scores))
    assert measure_answer(task, served, y[ROWS:], found.floor) == pytest.approx(found.ensemble, nan_ok=True)
    if task == "regression":
        score = interval_width(found.served, spec.abstention.level)
    else:
        score = found.served.scores[spec.abstention.score]
        score = score if score.ndim == 1 else score.max(axis=1)
    np.testing.assert_array_equal(server.abstain(), score > found.threshold.threshold)
    assert found.test_abstention[0] == pytest.approx(1 - server.abstain().mean())


def test_the_uncertainty_reference_is_the_validation_mean_of_each_rows_largest_score():
    probs, y = _labels(np.random.default_rng(16))
    found = assess_head("multilabel", NAMES, *_split(probs, y), weighting="uniform", calibrate=True,
                        target_error=None, seed=0)
    val = tasks.combine("multilabel", probs[:, :ROWS].transpose(1, 0, 2), found.weights, found.selection.calibration)
    for score, value in val.scores.items():
        assert found.validation_scores[score] == pytest.approx(value.max(axis=1).mean())
    assert found.head_spec("tags", ["a", "b", "c"]).uncertainty_reference == found.validation_scores
    assert found.head_spec("tags", ["a", "b", "c"]).abstention is None  # no target error: no rule


# -- abstention ---------------------------------------------------------------------------------

def test_a_regression_width_threshold_is_the_largest_meeting_the_target():
    width = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    loss = np.array([0.0, 0.1, 0.2, 2.0, 0.0])  # sqrt of the running mean: 0, .22, .32, .77, .69
    assert fit_rms_threshold(width, loss, 0.5) == (3.0, 0.6, pytest.approx(np.sqrt(0.1)))
    assert fit_rms_threshold(width, loss, 0.8)[0] == 5.0
    assert fit_rms_threshold(width, loss, float(np.sqrt(0.1)))[0] == 3.0  # at most the target: its own risk passes
    assert fit_rms_threshold(width + 1, np.full(5, 4.0), 0.5) == (-1.0, 0.0, 0.0)


def test_regression_abstains_on_rows_with_wide_intervals():
    rng = np.random.default_rng(17)
    raw, y = _regression(rng, noise=0.2, member_noise=0.05, stated_variance=0.01)
    noisy = rng.random(2 * ROWS) < 0.3  # a third of the rows: the members disagree and err
    raw[:, noisy, 0] += rng.normal(size=(4, noisy.sum())) * 3.0
    found = assess_head("regression", NAMES, *_split(raw, y), variance=True, weighting="uniform", target_error=0.3,
                        seed=0)
    t = found.threshold
    assert t.score == "interval_width" and t.level == ABSTAIN_LEVEL
    assert 0.5 < t.coverage < 0.9 and t.risk <= 0.3
    answered = interval_width(found.served, ABSTAIN_LEVEL) <= t.threshold
    assert noisy[ROWS:][~answered].mean() > 0.8  # it abstains mostly on the noisy rows
    assert found.error_auroc["epistemic_std"] > 0.6


def test_arguments_are_checked_with_what_to_change():
    probs, y = _labels(np.random.default_rng(18))
    with pytest.raises(ValueError, match="one column"):
        assess_head("binary", NAMES, *_split(probs, y))
    with pytest.raises(ValueError, match="3 member names but 4"):
        assess_head("multilabel", NAMES[:3], *_split(probs, y))
    with pytest.raises(ValueError, match="only a regression head"):
        member_outputs("multilabel", probs, variance=True)
    with pytest.raises(ValueError, match="has 2 labels"):
        assess_head("binary", NAMES, *_split(probs[..., :1], y[:, 0]), weighting="uniform").head_spec("b", ["yes"])
    with pytest.raises(ValueError, match="chosen must pair names"):
        assess_head("multilabel", NAMES, *_split(probs, y), chosen=(["m0", "m9"], [0.5, 0.5]))


def test_a_second_head_is_judged_with_the_members_and_weights_chosen_on_the_first():
    raw, y = _regression(np.random.default_rng(19), worse={2: 8})
    first = assess_head("regression", NAMES, *_split(raw, y), variance=True, weighting="pruned", seed=0)
    probs, labels = _labels(np.random.default_rng(20), sharpness=3.0)
    second = assess_head("multilabel", NAMES, *_split(probs, labels), weighting="pruned", seed=0,
                         chosen=(first.kept, first.weights))
    assert second.kept == first.kept == ["m0", "m1", "m3"] and second.weights == first.weights
    assert not second.selection.removed and all(t > 1.3 for t in second.selection.calibration)
