"""Choosing member configurations from a search's ranked results (pure)."""

from __future__ import annotations

import pytest

from training.members import distinct_configs, plan_tuned_members

A, B, C = {"units": 32}, {"units": 64}, {"units": 128}


def test_distinct_configs_drops_hyperband_repeats_in_rank_order():
    assert distinct_configs([A, A, B, A, C], 2) == [A, B]
    assert distinct_configs([A, B], 5) == [A, B]


def test_plan_takes_top_k_distinct_with_their_own_seeds():
    plans = plan_tuned_members([B, A, B, C], 3, seed=10)
    assert [(p.name, p.kind, p.hyperparameters, p.seed) for p in plans] == [
        ("tuned-0", "tuned", B, 10), ("tuned-1", "tuned", A, 11), ("tuned-2", "tuned", C, 12)]


def test_plan_fills_with_new_seeds_of_the_best_when_search_found_too_few():
    plans = plan_tuned_members([A, A], 3, seed=0)
    assert [(p.name, p.kind, p.hyperparameters, p.seed) for p in plans] == [
        ("tuned-0", "tuned", A, 0), ("seed-1", "seed", A, 1), ("seed-2", "seed", A, 2)]


@pytest.mark.parametrize("ranked, k", [([A], 0), ([], 2)])
def test_plan_refuses_impossible_requests(ranked, k):
    with pytest.raises(ValueError):
        plan_tuned_members(ranked, k, seed=0)
