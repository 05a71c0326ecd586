"""The dynamic program against brute force, and the reachable-target check."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ziplm.errors import UnreachableTargetError
from ziplm.stages.search import dp_solve


@pytest.mark.parametrize("seed", range(5))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    stages, levels = 5, 4
    times = [np.r_[0.0, np.sort(rng.uniform(0.1, 5, levels - 1))] for _ in range(stages)]
    errors = [np.r_[np.sort(rng.uniform(0, 10, levels - 1))[::-1], 0.0] for _ in range(stages)]  # more time, less error
    budget = float(rng.uniform(4, 15))
    chosen = dp_solve(times, errors, budget, buckets=20_000)
    total = lambda choice, values: sum(values[m][k] for m, k in enumerate(choice))  # noqa: E731
    feasible = [c for c in itertools.product(range(levels), repeat=stages) if total(c, times) <= budget]
    assert total(chosen, times) <= budget + 1e-9
    assert total(chosen, errors) == pytest.approx(min(total(c, errors) for c in feasible))


def test_dp_rejects_an_infeasible_budget():
    with pytest.raises(ValueError, match="no combination"):
        dp_solve([np.array([2.0, 3.0])], [np.array([1.0, 0.0])], budget=1.0)


def test_unreachable_target_names_the_largest_reachable(tiny_table):

    with pytest.raises(UnreachableTargetError, match=rf"largest reachable speedup is {tiny_table.max_speedup():.2f}x"):
        tiny_table.module_budget(1000.0)
    assert tiny_table.module_budget(1.2) > 0
