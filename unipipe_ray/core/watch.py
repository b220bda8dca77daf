"""The reward-hacking watch: the proxy reward rising while the gold reward falls.

RLHF optimises a proxy (the reward model, plus any rule reward); when the task also has a gold reward (an
answer checker, a rule), the two should move together. Over the last ``window`` iterations:

* ``watch/divergence`` = proxy slope - gold slope, each a least-squares slope in units of its own spread
  over the run (a trend metric to plot);
* the verdict: the second half of the window against the first half, for proxy and gold separately, as a
  two-sample z statistic from the iterations' sample means, standard deviations and sample counts. It fires
  when the proxy rose by more than ``z`` standard errors while the gold fell by more than ``z``.

Why a test and not the slopes alone: an iteration's mean over a few dozen samples is noisy, and with slopes
alone the watch fired on noise in a SmolLM2 quickstart run (gold 0.34, 0.72, 0.19 on 32 samples each).
Without standard deviations (``update(proxy, gold)``) it falls back to the slope signs with ``tolerance``.
Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import math
import statistics


def slope(values: list[float]) -> float:
    """Least-squares slope of values against 0, 1, 2, ..."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


def change_z(means: list[float], stds: list[float], counts: list[int]) -> float:
    """z statistic of (mean of the later half) - (mean of the earlier half), pooling the iterations' samples.
    An odd-length window leaves its middle iteration out."""
    half = len(means) // 2

    def pooled(idx):
        n = sum(counts[i] for i in idx)
        mean = sum(means[i] * counts[i] for i in idx) / n
        # total variance of the pooled samples: within-iteration plus between-iteration parts
        var = sum(counts[i] * (stds[i] ** 2 + (means[i] - mean) ** 2) for i in idx) / n
        return mean, var, n

    (m0, v0, n0), (m1, v1, n1) = pooled(range(half)), pooled(range(len(means) - half, len(means)))
    se = math.sqrt(v0 / n0 + v1 / n1)
    diff = m1 - m0
    if se == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / se


class HackingWatch:
    def __init__(self, window: int = 4, tolerance: float = 0.05, z: float = 2.0):
        self.window, self.tolerance, self.z = window, tolerance, z
        self.proxy: list[float] = []
        self.gold: list[float] = []
        self.stats: list[tuple[float, float, int]] = []  # (proxy std, gold std, samples) per iteration

    def update(self, proxy_mean: float, gold_mean: float, proxy_std: float | None = None,
               gold_std: float | None = None, samples: int | None = None) -> dict:
        """Add one iteration's mean proxy and gold rewards (with their standard deviations and sample count
        when known); return the divergence metric, the z statistics and the verdict."""
        self.proxy.append(proxy_mean)
        self.gold.append(gold_mean)
        known = None not in (proxy_std, gold_std, samples)
        self.stats.append((proxy_std, gold_std, samples) if known else None)
        out = {"watch/divergence": 0.0, "watch/hacking": 0.0, "watch/proxy_z": 0.0, "watch/gold_z": 0.0}
        if len(self.proxy) < self.window:
            return out
        proxy, gold = self.proxy[-self.window:], self.gold[-self.window:]
        out["watch/divergence"] = slope(proxy) / _spread(self.proxy) - slope(gold) / _spread(self.gold)
        stats = self.stats[-self.window:]
        if all(s is not None for s in stats):
            counts = [s[2] for s in stats]
            out["watch/proxy_z"] = change_z(proxy, [s[0] for s in stats], counts)
            out["watch/gold_z"] = change_z(gold, [s[1] for s in stats], counts)
            hacking = out["watch/proxy_z"] > self.z and out["watch/gold_z"] < -self.z
        else:
            hacking = (slope(proxy) / _spread(self.proxy) > self.tolerance
                       and slope(gold) / _spread(self.gold) < -self.tolerance)
        out["watch/hacking"] = float(hacking)
        return out

    def state_dict(self) -> dict:
        return {"proxy": list(self.proxy), "gold": list(self.gold), "stats": [list(s) if s else None
                                                                             for s in self.stats]}

    def load_state_dict(self, state: dict) -> None:
        self.proxy, self.gold = list(state["proxy"]), list(state["gold"])
        self.stats = [tuple(s) if s else None for s in state.get("stats", [None] * len(self.proxy))]


def _spread(values: list[float]) -> float:
    # A flat series has no spread; 1.0 keeps its slope (0) at 0 instead of dividing by zero.
    return statistics.pstdev(values) or 1.0
