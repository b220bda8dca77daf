"""The sweep report's statistics: means over seeds with t-intervals, the best split per budget,
iso-performance, the cold start, and the best configuration of any other search.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict

from unipipe_ray.tune.trials import finished, is_number

# Two-sided 95% Student t quantiles, 1-10 degrees of freedom (seeds are few; scipy is not a dependency).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(df: int) -> float:
    """The 97.5% t quantile: the table, beyond it the Cornish-Fisher expansion (within 0.003 at df = 11)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)



def mode_sign(mode: str) -> int:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    return 1 if mode == "max" else -1



def mean_interval(values: list[float], own: tuple = (None, None)) -> dict:
    """{"mean", "low", "high", "n"}: the mean over seeds with its 95% t-interval; with one seed, ``own``
    (the trial's bootstrap interval over held-out examples) or NaN bounds."""
    n, mean = len(values), statistics.fmean(values)
    if n > 1:
        half = t975(n - 1) * statistics.stdev(values) / math.sqrt(n)
        return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}
    low, high = own if all(is_number(x) for x in own) else (math.nan, math.nan)
    return {"mean": mean, "low": low, "high": high, "n": 1}



def group_by(records: list[dict], metric: str, key) -> dict:
    """{key(record): mean_interval + "format_miss" (mean over seeds, or None)} of the finished trials."""
    groups, out = defaultdict(list), {}
    for r in finished(records, metric):
        groups[key(r)].append(r["metrics"])
    for k, ms in groups.items():
        out[k] = mean_interval([m[metric] for m in ms], (ms[0].get(f"{metric}_low"), ms[0].get(f"{metric}_high")))
        misses = [m["format_miss"] for m in ms if is_number(m.get("format_miss"))]
        out[k]["format_miss"] = statistics.fmean(misses) if misses else None
    return out



def is_split(r: dict) -> bool:
    """An allocation trial: it searched budget and sft_ratio."""
    return "budget" in r["params"] and "sft_ratio" in r["params"]



def split_cells(records: list[dict], metric: str) -> dict[tuple, dict]:
    """{(budget, r): {"mean", "low", "high", "n", "format_miss"}} over the seeds, sorted by budget then r."""
    key = lambda r: (r["params"]["budget"], float(r["params"]["sft_ratio"]))
    return dict(sorted(group_by([r for r in records if is_split(r)], metric, key).items()))



def best_split(cells: dict[tuple, dict], mode: str = "max") -> dict:
    """{budget: {"r", "mean", "low", "high", "runner_up", "clear"}}: the best r (ties keep the smaller r) and
    whether its interval clears the runner-up's: True, False (they overlap) or None (no runner-up/interval)."""
    sign, out = mode_sign(mode), {}
    for budget in sorted({b for b, _ in cells}):
        ranked = sorted(((r, c) for (b, r), c in cells.items() if b == budget), key=lambda rc: -sign * rc[1]["mean"])
        (r, c), runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        clear = None
        if runner and all(is_number(x) for x in (c["low"], c["high"], runner[1]["low"], runner[1]["high"])):
            clear = c["low"] > runner[1]["high"] if sign > 0 else c["high"] < runner[1]["low"]
        out[budget] = {"r": r, "mean": c["mean"], "low": c["low"], "high": c["high"],
                       "runner_up": runner and runner[0], "clear": clear}
    return out



def iso_performance(cells: dict[tuple, dict], best: dict, mode: str = "max") -> list[dict]:
    """For each (N, r): the smallest budget N' whose best split reaches at least that mean (N' <= N, as N's
    own best split does). Rows {"budget", "r", "mean", "match_budget", "match_r", "match_mean"}."""
    sign, rows = mode_sign(mode), []
    for (budget, r), c in cells.items():
        match = min(b for b, e in best.items() if sign * e["mean"] >= sign * c["mean"])
        rows.append({"budget": budget, "r": r, "mean": c["mean"], "match_budget": match,
                     "match_r": best[match]["r"], "match_mean": best[match]["mean"]})
    return rows



def cold_start(cells: dict[tuple, dict]) -> list[dict]:
    """Per budget with r = 0: format_miss there vs at the smallest r > 0 (0.1 in the paper's grid,
    docs/allocation.md)."""
    rows = []
    for budget in sorted({b for b, r in cells if r == 0}):
        above = sorted(r for b, r in cells if b == budget and r > 0)
        if above and None not in (cells[(budget, 0.0)]["format_miss"], cells[(budget, above[0])]["format_miss"]):
            rows.append({"budget": budget, "r": above[0], "miss_r0": cells[(budget, 0.0)]["format_miss"],
                         "miss_r": cells[(budget, above[0])]["format_miss"]})
    return rows



def searched_params(records: list[dict]) -> list[str]:
    """The parameters whose value differs between trials (seed excluded: it is replication, not a setting)."""
    keys = sorted({k for r in records for k in r["params"]} - {"seed"})
    return [k for k in keys if len({json.dumps(r["params"].get(k)) for r in records}) > 1]



def best_config(records: list[dict], metric: str, mode: str = "max") -> tuple[dict, dict] | None:
    """(params without seed, its group_by entry over seeds) of the best configuration; None if none finished."""
    sign = mode_sign(mode)
    groups = group_by(records, metric, lambda r: json.dumps({k: v for k, v in r["params"].items() if k != "seed"},
                                                            sort_keys=True))
    best = max(groups, key=lambda g: sign * groups[g]["mean"], default=None)
    return (json.loads(best), groups[best]) if best else None
