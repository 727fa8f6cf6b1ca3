"""Cross-fitting's arithmetic (training/crossfit.py): folds cover every row once, out-of-fold
outputs come from the model that held the row out, and a member's fold-averaged output, combined
over members, is exactly what the server serves by combining every fold model."""

from __future__ import annotations

import numpy as np
import pytest

from contract import tasks
from training.crossfit import CrossFitted, MemberModel, fold_average, folds_of, out_of_fold


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_folds_cover_every_row_once_and_classes_are_stratified(task):
    target = np.repeat([0, 1, 2], [20, 30, 50]) if task == "classification" else np.linspace(0, 1, 100)
    folds = folds_of(target, task, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    assert all(np.all(np.diff(f) > 0) for f in folds)
    if task == "classification":
        assert [np.bincount(target[f]).tolist() for f in folds] == [[4, 6, 10]] * 5
    assert [f.tolist() for f in folds_of(target, task, 5, seed=3)] == [f.tolist() for f in folds]
    assert [f.tolist() for f in folds_of(target, task, 5, seed=4)] != [f.tolist() for f in folds]


def test_out_of_fold_outputs_come_from_the_model_that_held_the_row_out():
    folds = [np.array([0, 3]), np.array([1, 4]), np.array([2])]
    outputs = [np.full((len(f), 2), k, dtype=float) for k, f in enumerate(folds)]
    np.testing.assert_array_equal(out_of_fold(outputs, folds, 5)[:, 0], [0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="do not cover every development row"):
        out_of_fold(outputs[:2], folds[:2], 5)


def test_a_fold_average_combined_over_members_is_the_served_mixture_over_every_fold_model():
    rng = np.random.default_rng(0)
    members, k_folds, rows, k = 3, 4, 7, 2
    # Each fold model's Gaussian head: k means then k variances.
    models = [[np.concatenate([rng.normal(size=(rows, k)), rng.uniform(0.1, 2, size=(rows, k))], axis=1)
               for _ in range(k_folds)] for _ in range(members)]
    weights = [0.5, 0.3, 0.2]
    averaged = np.stack([fold_average(m, "regression", True) for m in models])  # (members, rows, 2k)
    assessed = tasks.combine("regression", np.moveaxis(averaged[..., :k], 0, 1), weights, 1.7,
                             np.moveaxis(averaged[..., k:], 0, 1))
    flat = np.stack([o for m in models for o in m])  # every fold model, as the server sees them
    flat_weights = [w / k_folds for w in weights for _ in range(k_folds)]
    served = tasks.combine("regression", np.moveaxis(flat[..., :k], 0, 1), flat_weights, 1.7,
                           np.moveaxis(flat[..., k:], 0, 1))
    np.testing.assert_allclose(assessed.value, served.value, rtol=1e-12)
    np.testing.assert_allclose(assessed.variance, served.variance, rtol=1e-12)
    probabilities = [[rng.dirichlet(np.ones(3), size=rows) for _ in range(k_folds)] for _ in range(members)]
    averaged = np.stack([fold_average(m, "classification", False) for m in probabilities])
    flat = np.stack([o for m in probabilities for o in m])
    np.testing.assert_allclose(
        tasks.combine("classification", np.moveaxis(averaged, 0, 1), weights, 0.8).value,
        tasks.combine("classification", np.moveaxis(flat, 0, 1), flat_weights, 0.8).value, rtol=1e-12)


def test_published_fold_models_carry_a_kth_of_their_members_weight_grouped_by_member():
    folds = [MemberModel(m, k, f"{m}-fold{k}", "seed", None, {}) for k in range(3) for m in ("a", "b", "c")]
    fitted = CrossFitted(["a", "b", "c"], {}, {}, np.zeros(0), np.zeros(0), folds, [np.full((2, 1), i) for i in range(9)])
    published = fitted.published({"c": 0.4, "a": 0.6})
    assert [(f.name, round(w, 6)) for f, w in published] == [
        ("a-fold0", 0.2), ("a-fold1", 0.2), ("a-fold2", 0.2), ("c-fold0", 0.133333), ("c-fold1", 0.133333),
        ("c-fold2", 0.133333)]
    outputs, weights = fitted.served_test({"c": 0.4, "a": 0.6})
    assert outputs[:, 0, 0].tolist() == [0, 3, 6, 2, 5, 8] and sum(weights) == pytest.approx(1.0)
