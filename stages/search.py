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
