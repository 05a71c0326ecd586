"""Choosing each module's level for a speedup target: the SPDY dynamic program (ALGORITHMS.md section 3).

Every attention module and every FFN module is one DP stage with its levels' (time, error) pairs. The time budget
T (ms the modules may take on top of the table's base) is split into B buckets, each level's time rounded up to
whole buckets (so the budget holds), and

    DP[m][b] = min over levels k of DP[m-1][b - t_m(k)] + err_m(k)

gives the least total error within b buckets; backtracking from DP[last][B] gives the levels. Cost O(M * K * B).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ziplm.families import ModelStructure
from ziplm.errors import UnreachableTargetError
from ziplm.runtimes.latency_table import LatencyTable


def dp_solve(times: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float,
             buckets: int = 10_000) -> list[int]:
    """Level index per stage minimising summed error with summed time <= budget; ValueError when infeasible."""
    if budget <= 0:
        raise ValueError(f"time budget {budget:.4f} ms leaves nothing for the modules")
    bucket_ms = budget / buckets
    costs = [np.ceil(np.maximum(np.asarray(t, dtype=float), 0.0) / bucket_ms - 1e-9).astype(np.int64) for t in times]
    best = np.zeros(buckets + 1)  # least error of the stages so far within b buckets
    choices = []
    for cost, error in zip(costs, errors):
        new = np.full(buckets + 1, np.inf)
        choice = np.zeros(buckets + 1, dtype=np.int32)
        for k, (c, e) in enumerate(zip(cost, error)):
            if c > buckets:
                continue
            candidate = np.full(buckets + 1, np.inf)
            candidate[c:] = best[: buckets + 1 - c] + e
            better = candidate < new
            new[better], choice[better] = candidate[better], k
        best = new
        choices.append(choice)
    if not np.isfinite(best[buckets]):
        raise ValueError("no combination of levels fits the budget")
    levels, b = [], buckets
    for cost, choice in zip(reversed(costs), reversed(choices)):
        k = int(choice[b])
        levels.append(k)
        b -= int(cost[k])
    return levels[::-1]


def max_speedup(table: LatencyTable) -> float:
    """The predicted speedup with every module removed: nothing faster can be built from this table."""
    shape = table.model_shape
    return table.dense_ms() / table.predict_ms(ModelStructure.uniform(shape, 0, 0))


def module_budget(table: LatencyTable, speedup: float) -> float:
    """Raw table ms the modules may take so that the corrected prediction is dense / speedup."""
    target_ms = table.dense_ms() / speedup
    budget = table.correction.invert(target_ms) - table.base_ms
    reachable = max_speedup(table)
    if budget <= 0 or speedup > reachable:
        raise UnreachableTargetError(
            f"speedup {speedup:g}x cannot be reached in this environment: the latency table's largest reachable "
            f"speedup is {reachable:.2f}x (every module removed); lower the target"
        )
    return budget
