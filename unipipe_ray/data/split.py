"""Split a fixed annotation budget between SFT and preference data.

Raghavendra, Kang, Ritter, "Balancing the Budget", ACL 2025 (arXiv 2502.11284).

With budget N and SFT ratio r: round(N * r) questions become SFT demonstrations, the other N - round(N * r)
preference pairs. The two sets are disjoint: a question used for SFT is not reused for a pair, so each
question costs one unit of budget.
"""
from __future__ import annotations

import math
import random


def sft_count(budget: int, sft_ratio: float) -> int:
    """round(budget * sft_ratio), half-up (2.5 -> 3, not Python's half-to-even): the SFT share of a budget."""
    return math.floor(budget * sft_ratio + 0.5)


def budget_split(pool_size: int, budget: int, sft_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """-> (sft_indices, pref_indices), disjoint indices into a pool of `pool_size` questions.

    The pool is shuffled once per seed and the budget taken from its front, SFT first. So for one seed a
    smaller budget's questions are a subset of a larger budget's, and a larger r only moves questions from
    the preference set to the SFT set: budget grids compare splits, not different question draws.
    round() is half-up (N * r = 2.5 gives 3), not Python's half-to-even.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if budget > pool_size:
        raise ValueError(f"budget {budget} exceeds the pool of {pool_size} questions")
    if not 0.0 <= sft_ratio <= 1.0:
        raise ValueError(f"sft_ratio must be in [0, 1], got {sft_ratio}")
    order = list(range(pool_size))
    random.Random(seed).shuffle(order)
    n_sft = sft_count(budget, sft_ratio)
    return order[:n_sft], order[n_sft:budget]
