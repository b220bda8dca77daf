"""Confidence intervals and paired significance tests over per-example scores (numpy + standard library).

Paired functions take ``(values_a, values_b)`` with A the baseline and report B relative to A: the
difference is B - A and a "win" is B > A. Every resampling function takes a seed and is deterministic.

References:
  Efron & Tibshirani (1993), An Introduction to the Bootstrap (percentile ch. 13, BCa ch. 14, tests ch. 16).
  Efron (1987), Better bootstrap confidence intervals, JASA 82:171-185 (BCa).
  Davison & Hinkley (1997), Bootstrap Methods and their Application, sec. 4.4 (bootstrap p-values).
  McNemar (1947), Psychometrika 12:153-157; Edwards (1948) for the continuity correction.
  Dror et al. (2018), The Hitchhiker's Guide to Testing Statistical Significance in NLP, ACL.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np

_CHUNK_ELEMENTS = 1 << 22  # resample in row chunks of ~4M indices so memory stays flat for large n
# McNemar: below 25 discordant pairs the chi-square approximation is poor, so use the exact binomial test.
_EXACT_BELOW = 25


def _as_1d(values, name: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _row_statistic(statistic: Callable, samples: np.ndarray) -> np.ndarray:
    """statistic over each row of ``samples`` (m, k) -> (m,). numpy reductions (anything taking ``axis``)
    run vectorised; other callables get one call per row."""
    if "axis" in _parameters(statistic):
        return np.asarray(statistic(samples, axis=-1), dtype=np.float64)
    return np.array([statistic(row) for row in samples], dtype=np.float64)


def _parameters(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # some builtins have no signature: treat as not vectorised
        return set()


def _bootstrap_distribution(
    values: np.ndarray, statistic: Callable, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_resamples,) statistics of samples drawn with replacement from ``values`` (Efron & Tibshirani, ch. 6)."""
    n = values.size
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = []
    for start in range(0, n_resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, n_resamples - start), n))
        out.append(_row_statistic(statistic, values[idx]))
    return np.concatenate(out)


def _jackknife(values: np.ndarray, statistic: Callable) -> np.ndarray:
    """(n,) leave-one-out statistics; row i skips index i (j + (j >= i) maps 0..n-2 onto the other indices)."""
    n = values.size
    if statistic is np.mean:  # closed form; the generic path costs O(n^2)
        return (values.sum() - values) / (n - 1)
    rows = max(1, _CHUNK_ELEMENTS // n)
    j = np.arange(n - 1)
    out = []
    for start in range(0, n, rows):
        i = np.arange(start, min(n, start + rows))[:, None]
        out.append(_row_statistic(statistic, values[j + (j >= i)]))
    return np.concatenate(out)


def _bca_levels(
    values: np.ndarray, statistic: Callable, boot: np.ndarray, estimate: float, alpha: float
) -> tuple[float, float] | None:
    """BCa-adjusted percentile levels (Efron 1987; Efron & Tibshirani eq. 14.10, 14.15), or None if undefined."""
    # Mid-rank for the bias term: with discrete data (accuracies) many resamples equal the estimate exactly.
    frac = (np.sum(boot < estimate) + 0.5 * np.sum(boot == estimate)) / boot.size
    if values.size < 3 or not 0.0 < frac < 1.0:
        return None
    normal = NormalDist()
    z0 = normal.inv_cdf(frac)
    jack = _jackknife(values, statistic)
    d = jack.mean() - jack
    denom = 6.0 * np.sum(d**2) ** 1.5
    accel = float(np.sum(d**3) / denom) if denom > 0 else 0.0
    levels = []
    for q in (alpha / 2, 1 - alpha / 2):
        z = z0 + normal.inv_cdf(q)
        levels.append(normal.cdf(z0 + z / (1 - accel * z)))
    return (levels[0], levels[1]) if all(0.0 <= q <= 1.0 for q in levels) else None


def bootstrap_ci(
    values,
    statistic: Callable = np.mean,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "percentile",
) -> tuple[float, float, float]:
    """(estimate, low, high): ``statistic(values)`` and a two-sided bootstrap confidence interval.

    method="percentile" (default): the alpha/2 and 1 - alpha/2 quantiles of the bootstrap distribution
    (Efron & Tibshirani ch. 13). method="bca": bias-corrected and accelerated percentiles (Efron 1987),
    bias from the bootstrap distribution, acceleration from the jackknife; falls back to percentile where
    BCa is undefined (n < 3, or every resample on one side of the estimate).
    n = 1 and constant inputs give low = high = estimate. ``statistic`` maps a 1-D array to a number; numpy
    reductions that take ``axis`` are evaluated vectorised.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    values = _as_1d(values)
    estimate = float(statistic(values))
    boot = _bootstrap_distribution(values, statistic, n_resamples, np.random.default_rng(seed))
    if np.all(boot == boot[0]):  # n = 1 or constant data: no spread to estimate
        return estimate, estimate, estimate
    alpha = 1.0 - confidence
    levels = (alpha / 2, 1 - alpha / 2)
    if method == "bca":
        levels = _bca_levels(values, statistic, boot, estimate, alpha) or levels
    low, high = np.quantile(boot, levels)
    return estimate, float(low), float(high)


def paired_bootstrap(values_a, values_b, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of the mean difference B - A (Efron & Tibshirani ch. 16; Koehn 2004 for MT).

    Example indices are resampled jointly, so each resample keeps A's and B's score of the same example
    together; the mean of resampled differences is the difference of resampled means.
    Returns diff = mean(b - a), (low, high) its percentile interval, and the two-sided p-value for
    H0: mean difference = 0 from the null-centred bootstrap distribution (Davison & Hinkley eq. 4.11):
        p = (1 + #{b : |d*_b - d| >= |d|}) / (1 + n_resamples),
    i.e. how often a resample deviates from the observed d by at least |d|. The +1 keeps p > 0, so the
    smallest reportable p is 1 / (1 + n_resamples). Identical inputs give diff 0 and p = 1.
    """
    a, b = _as_1d(values_a, "values_a"), _as_1d(values_b, "values_b")
    if a.size != b.size:
        raise ValueError(f"paired inputs differ in length: {a.size} vs {b.size}")
    diffs = b - a
    diff = float(diffs.mean())
    boot = _bootstrap_distribution(diffs, np.mean, n_resamples, np.random.default_rng(seed))
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, (alpha / 2, 1 - alpha / 2))
    # A tiny tolerance so float noise in d*_b - d does not decide ties with |d| (e.g. identical inputs).
    extreme = np.sum(np.abs(boot - diff) >= abs(diff) - 1e-12)
    p_value = float((1 + extreme) / (1 + n_resamples))
    return {"diff": diff, "low": float(low), "high": float(high), "p_value": p_value}


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips: 2 * P(X <= min(k, n - k)), capped at 1.
    Integer sums then one correctly rounded division, so large n does not underflow."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1))
    return min(1.0, 2 * tail / 2**n)


def chi2_sf_1dof(x: float) -> float:
    """Upper tail of the chi-square distribution with 1 degree of freedom: P(Z^2 >= x) = erfc(sqrt(x / 2))."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2))


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test for paired binary outcomes (McNemar 1947), e.g. per-example correctness of two models.

    b = #(A right, B wrong), c = #(A wrong, B right); only these discordant pairs carry information.
    If b + c < 25: exact binomial test, statistic = min(b, c), p = 2 * P(X <= min(b, c)),
    X ~ Bin(b + c, 1/2). Otherwise: chi-square with continuity correction (Edwards 1948),
    statistic = (|b - c| - 1)^2 / (b + c), p = chi-square(1) upper tail. b + c = 0 gives p = 1.
    """
    a = np.asarray(correct_a, dtype=bool).reshape(-1)
    bb = np.asarray(correct_b, dtype=bool).reshape(-1)
    if a.size != bb.size:
        raise ValueError(f"paired inputs differ in length: {a.size} vs {bb.size}")
    b, c = int(np.sum(a & ~bb)), int(np.sum(~a & bb))
    if b + c < _EXACT_BELOW:
        return {
            "b": b,
            "c": c,
            "statistic": float(min(b, c)),
            "p_value": binomial_two_sided_p(b, b + c),
            "method": "exact",
        }
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": float(stat), "p_value": chi2_sf_1dof(stat), "method": "chi2"}


def sign_test(values_a, values_b) -> dict:
    """Exact two-sided sign test (Dror et al. 2018, sec. 3) on paired scores.

    wins = #(B > A), losses = #(B < A), ties dropped; p = 2 * P(X <= min(wins, losses)),
    X ~ Bin(wins + losses, 1/2), capped at 1 (p = 1 when every pair ties).
    """
    a, b = _as_1d(values_a, "values_a"), _as_1d(values_b, "values_b")
    if a.size != b.size:
        raise ValueError(f"paired inputs differ in length: {a.size} vs {b.size}")
    wins, losses = int(np.sum(b > a)), int(np.sum(b < a))
    return {
        "wins": wins,
        "losses": losses,
        "ties": int(a.size - wins - losses),
        "p_value": binomial_two_sided_p(wins, wins + losses),
    }


def summarize(
    values, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0, method: str = "percentile"
) -> dict:
    """dict(mean, low, high, n): the mean and its bootstrap interval (``bootstrap_ci``)."""
    values = _as_1d(values)
    mean, low, high = bootstrap_ci(values, np.mean, confidence, n_resamples, seed, method)
    return {"mean": mean, "low": low, "high": high, "n": int(values.size)}


def format_ci(estimate: float, low: float, high: float, digits: int = 3) -> str:
    """'0.625 [0.58, 0.67]': bounds get one digit fewer, as they are less certain than the estimate."""
    bound = max(digits - 1, 0)
    return f"{estimate:.{digits}f} [{low:.{bound}f}, {high:.{bound}f}]"


def significant(p_value: float, alpha: float = 0.05) -> bool:
    """p < alpha (strict, the usual convention)."""
    return p_value < alpha
