"""The reward-hacking watch: the reward model's score rising while the gold reward falls.

RLHF optimises a proxy (the reward model); when the task also has a gold reward (an answer checker, a
rule), the two should move together. Over the last ``window`` iterations we fit a least-squares slope to
each, in units of its own spread over the run, and report ``divergence = proxy_slope - gold_slope``;
the watch fires when the proxy slope is positive and the gold slope negative by more than ``tolerance``.
Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import statistics


def slope(values: list[float]) -> float:
    """Least-squares slope of values against 0, 1, 2, ..."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


class HackingWatch:
    def __init__(self, window: int = 3, tolerance: float = 0.05):
        self.window, self.tolerance = window, tolerance
        self.proxy: list[float] = []
        self.gold: list[float] = []

    def update(self, proxy_mean: float, gold_mean: float) -> dict:
        """Add one iteration's mean proxy and gold rewards; return the divergence metric and the verdict."""
        self.proxy.append(proxy_mean)
        self.gold.append(gold_mean)
        if len(self.proxy) < self.window:
            return {"watch/divergence": 0.0, "watch/hacking": 0.0}
        proxy_slope = slope(self.proxy[-self.window:]) / _spread(self.proxy)
        gold_slope = slope(self.gold[-self.window:]) / _spread(self.gold)
        hacking = proxy_slope > self.tolerance and gold_slope < -self.tolerance
        return {"watch/divergence": proxy_slope - gold_slope, "watch/hacking": float(hacking)}

    def state_dict(self) -> dict:
        return {"proxy": list(self.proxy), "gold": list(self.gold)}

    def load_state_dict(self, state: dict) -> None:
        self.proxy, self.gold = list(state["proxy"]), list(state["gold"])


def _spread(values: list[float]) -> float:
    # A flat series has no spread; 1.0 keeps its slope (0) at 0 instead of dividing by zero.
    return statistics.pstdev(values) or 1.0
