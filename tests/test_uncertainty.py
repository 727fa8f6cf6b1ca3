"""Pool then calibrate, member selection, the honest comparison, uncertainty scores and
abstention: the pure arithmetic, on synthetic probabilities whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from contract.scores import LOG_FLOOR, SCORES, abstains, entropy, pool, served, temper, uncertainty
from training.abstention import apply_threshold, auroc, choose_threshold, fit_threshold, risk_coverage
from training.calibration import fit_temperature, tempered_losses
from training.compare import compare, select_member
from training.evaluate import expected_calibration_error, negative_log_likelihood
from training.gate import decide
from training.selection import prune, select


def _members(rng, rows=400, classes=4, members=5, sharpness=3.0, noise=1.0):
    """Members whose logits are the truth plus independent noise: each is over-confident in its
    own way, and their mean under-confident; labels drawn from the true distribution."""
    truth = rng.normal(size=(rows, classes)) * sharpness
    p_true = np.exp(truth) / np.exp(truth).sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=p) for p in p_true])
    logits = truth[None] + rng.normal(size=(members, rows, classes)) * noise * sharpness
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return probs, labels


def test_temper_keeps_argmax_and_rows_summing_to_one_and_zero_stays_finite():
    p = np.array([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]])
    for t in (0.3, 1.0, 4.0):
        q = temper(p, t)
        assert np.all(np.isfinite(q)) and np.allclose(q.sum(1), 1.0)
        assert (q.argmax(1) == p.argmax(1)).all()
    assert temper(p, 0.5)[0, 0] > 0.7 > temper(p, 2.0)[0, 0]  # sharper below 1, flatter above
    assert temper(p, 1.0) is p
    assert temper(p, 0.5)[0, 2] <= LOG_FLOOR  # a zero stays next to nothing


def test_served_is_the_weighted_mean_tempered():
    rng = np.random.default_rng(0)
    members = rng.dirichlet(np.ones(3), size=(6, 2))  # (rows, members, classes)
    np.testing.assert_allclose(pool(members, [0.25, 0.75]), 0.25 * members[:, 0] + 0.75 * members[:, 1])
    np.testing.assert_allclose(served(members, [0.5, 0.5], 0.8), temper(members.mean(1), 0.8))


def test_uncertainty_splits_total_into_aleatoric_and_epistemic():
    agree = np.tile([[[0.5, 0.5]]], (1, 3, 1))  # every member unsure the same way
    disagree = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # two sure members, opposite
    w3, w2 = [1 / 3] * 3, [0.5, 0.5]
    a = uncertainty(pool(agree, w3), agree, w3)[0]
    d = uncertainty(pool(disagree, w2), disagree, w2)[0]
    np.testing.assert_allclose(a, [np.log(2), np.log(2), 0.0], atol=1e-9)  # aleatoric only
    np.testing.assert_allclose(d, [np.log(2), 0.0, np.log(2)], atol=1e-9)  # epistemic only
    rng = np.random.default_rng(1)
    m = rng.dirichlet(np.ones(5) * 0.5, size=(50, 4))
    u = uncertainty(pool(m, [0.25] * 4), m, [0.25] * 4)
    np.testing.assert_allclose(u[:, 0], u[:, 1] + u[:, 2], atol=1e-9)  # exact without calibration
    assert (u[:, 2] >= 0).all()
    tempered = uncertainty(served(m, [0.25] * 4, 0.5), m, [0.25] * 4)
    np.testing.assert_allclose(tempered[:, 0], entropy(served(m, [0.25] * 4, 0.5)))
    np.testing.assert_allclose(tempered[:, 1:], u[:, 1:])  # the split is the members' own
    assert abstains(u, "mutual_information", 0.1).tolist() == (u[:, 2] > 0.1).tolist()


def test_fitted_temperature_sharpens_an_underconfident_pool_and_lowers_nll():
    rng = np.random.default_rng(2)
    probs, labels = _members(rng)
    mean = probs.mean(0)
    t = fit_temperature(mean, labels)
    assert t < 1.0  # averaging made the pool under-confident
    before, after = negative_log_likelihood(mean, labels), negative_log_likelihood(temper(mean, t), labels)
    assert after < before
    assert tempered_losses(mean, labels, t).mean() == pytest.approx(after, rel=1e-4)
    for other in (t * 0.8, t * 1.25):  # a minimum
        assert tempered_losses(mean, labels, other).mean() > tempered_losses(mean, labels, t).mean()


def test_pruning_drops_a_much_worse_member_and_keeps_members_within_noise():
    rng = np.random.default_rng(3)
    probs, labels = _members(rng, rows=300, members=4, noise=0.6)
    names = ["a", "b", "c", "d"]
    kept, removed = prune(names, probs, labels)
    assert kept == [0, 1, 2, 3] and removed == []  # alike members: no evidence against any
    broken = np.roll(np.eye(4)[labels], 1, axis=1) * 0.9 + 0.025  # confidently wrong
    kept, removed = prune(names + ["bad"], np.concatenate([probs, broken[None]]), labels)
    assert kept == [0, 1, 2, 3] and [r.member for r in removed] == ["bad"]
    assert removed[0].high < 0 and removed[0].change < 0  # the evidence, as reported


def test_select_combines_weights_and_temperature_in_sequence():
    rng = np.random.default_rng(4)
    probs, labels = _members(rng, rows=300, members=3)
    uniform = select(["a", "b", "c"], probs, labels, "uniform")
    assert uniform.kept == [0, 1, 2] and uniform.weights == pytest.approx([1 / 3] * 3)
    assert uniform.temperature == pytest.approx(fit_temperature(probs.mean(0), labels), rel=1e-3)
    fitted = select(["a", "b", "c"], probs, labels, "fitted", calibrate=False)
    assert fitted.temperature == 1.0 and sum(fitted.weights) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        select(["a"], probs[:1], labels, "best")


def test_member_selected_on_validation_and_compared_with_intervals():
    rng = np.random.default_rng(5)
    probs, labels = _members(rng, rows=360, members=3)
    worse = probs.copy()
    worse[1] = temper(worse[1], 0.3)  # an even more over-confident member: higher NLL
    assert select_member(["a", "b", "c"], worse, labels) in ("a", "c")
    ensemble = temper(probs.mean(0), fit_temperature(probs.mean(0), labels))
    diff = compare(ensemble, probs[0], labels, seed=0, resamples=400)
    assert set(diff) == {"accuracy", "nll", "brier", "ece"}
    for d in diff.values():
        assert d.low <= d.difference <= d.high
    nll = diff["nll"]
    assert nll.difference == pytest.approx(negative_log_likelihood(ensemble, labels)
                                           - negative_log_likelihood(probs[0], labels), abs=1e-6)
    assert nll.better and nll.significant  # the calibrated mean of noisy members beats one of them
    assert diff["ece"].ensemble == pytest.approx(expected_calibration_error(ensemble, labels))
    assert "better (the interval excludes 0)" in nll.sentence()
    same = compare(probs[0], probs[0], labels, resamples=50)["accuracy"]
    assert (same.difference, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)


def test_gate_refuses_an_ensemble_shown_worse_than_the_selected_member():
    rng = np.random.default_rng(6)
    probs, labels = _members(rng, rows=360, members=2)
    bad = np.roll(probs[0], 1, axis=1)
    worse = compare(bad, probs[0], labels, resamples=200)["accuracy"]
    refused = decide({"accuracy": worse.ensemble}, None, "accuracy", 0.0, worse, "m1")
    assert not refused.passed and "worse than m1, the member chosen on validation" in refused.reason
    fine = compare(probs[0], probs[0], labels, resamples=50)["accuracy"]
    assert decide({"accuracy": fine.ensemble}, None, "accuracy", 0.0, fine, "m1").passed


def test_gate_tolerance_applies_to_the_interval_against_the_member():
    from training.compare import Difference

    slightly = Difference("accuracy", 0.97, 0.98, -0.01, -0.02, -0.005)  # shown worse, by 0.5-2 points
    assert not decide({"accuracy": 0.97}, None, "accuracy", 0.0, slightly, "m").passed
    assert decide({"accuracy": 0.97}, None, "accuracy", 0.01, slightly, "m").passed  # within tolerance
    nll = Difference("nll", 0.30, 0.20, 0.10, 0.04, 0.16)  # lower is better: shown worse
    assert not decide({"nll": 0.30}, None, "nll", 0.03, nll, "m").passed
    assert decide({"nll": 0.30}, None, "nll", 0.05, nll, "m").passed


def test_auroc_from_ranks():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_threshold_keeps_the_answered_error_rate_under_the_target():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    correct = np.array([1, 1, 1, 1, 0, 1, 1, 0, 0, 0], dtype=bool)
    thresholds, coverage, risk = risk_coverage(scores, correct)
    assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(0.4)
    assert fit_threshold(scores, correct, 0.0) == (0.4, 0.4, 0.0)
    assert fit_threshold(scores, correct, 0.2) == pytest.approx((0.7, 0.7, 1 / 7))
    assert fit_threshold(scores, ~np.ones(10, bool), 0.1) == (-1.0, 0.0, 0.0)  # unreachable
    tied = fit_threshold(np.array([0.1, 0.5, 0.5, 0.9]), np.array([1, 1, 0, 1], bool), 0.0)
    assert tied == (0.1, 0.25, 0.0)  # a tie is answered whole or not at all
    table = np.column_stack([scores, scores[::-1], np.zeros(10)])
    chosen = choose_threshold(table, correct, 0.2)
    assert chosen.score == "entropy" and chosen.coverage == 0.7
    assert apply_threshold(table, correct, chosen) == pytest.approx((0.7, 1 / 7))
    assert SCORES == ("entropy", "expected_entropy", "mutual_information")


def test_a_validation_split_the_pool_gets_all_right_does_not_make_it_certain_of_everything():
    labels = np.arange(30) % 3
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3  # every row right, 0.93 confident
    t = fit_temperature(probs, labels)
    assert 0.2 < t < 1.0  # sharper, as far as 30 rows justify; without the prior T -> 0.05
    assert temper(probs, t).max() < 1 - 1e-6
