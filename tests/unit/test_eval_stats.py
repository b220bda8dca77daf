import math
from statistics import NormalDist

import numpy as np
import pytest

from unipipe_ray.eval import stats
from unipipe_ray.eval.stats import (
    binomial_two_sided_p,
    bootstrap_ci,
    chi2_sf_1dof,
    format_ci,
    mcnemar,
    paired_bootstrap,
    sign_test,
    significant,
    summarize,
)


def test_bootstrap_ci_degenerate_inputs():
    """n = 1 and constant arrays have no spread: the interval collapses onto the estimate."""
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert bootstrap_ci([1.0] * 50, method="bca") == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_bootstrap_ci_deterministic_for_a_seed():
    x = np.random.default_rng(1).normal(size=60)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    assert paired_bootstrap(x, x + 0.1, seed=3) == paired_bootstrap(x, x + 0.1, seed=3)


def test_bootstrap_ci_close_to_normal_interval():
    """For the mean of n = 1000 standard normals the interval is about mean -/+ 1.96 * sd / sqrt(n)."""
    x = np.random.default_rng(0).normal(size=1000)
    est, low, high = bootstrap_ci(x, n_resamples=1000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert est == pytest.approx(x.mean())
    assert low == pytest.approx(est - half, abs=0.15 * half)
    assert high == pytest.approx(est + half, abs=0.15 * half)


def test_bootstrap_non_vectorised_statistic_matches_vectorised():
    """A plain callable (no ``axis``) is applied row by row to the same resamples: same numbers."""
    x = np.random.default_rng(2).exponential(size=40)
    for method in ("percentile", "bca"):
        fast = bootstrap_ci(x, np.median, n_resamples=300, method=method)
        slow = bootstrap_ci(x, lambda v: float(np.median(v)), n_resamples=300, method=method)
        assert slow == pytest.approx(fast)


def test_jackknife_rows_leave_one_out_in_chunks(monkeypatch):
    """The index trick j + (j >= i) equals deleting element i, also across chunk boundaries."""
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 12)  # 12 // 5 = 2 rows per chunk
    x = np.array([3.0, 1.0, 4.0, 1.5, 9.0])
    expected = [np.delete(x, i).sum() for i in range(x.size)]
    np.testing.assert_allclose(stats._jackknife(x, np.sum), expected)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_coverage_bernoulli(method):
    """Bernoulli(0.3), n = 100: over 200 seeded data sets the 95% interval should hold 0.3 about 95% of the
    time (percentile bootstrap of a binomial mean runs a little under; accept 0.90-0.99)."""
    rng = np.random.default_rng(12345)
    covered = 0
    for rep in range(200):
        x = (rng.random(100) < 0.3).astype(float)
        _, low, high = bootstrap_ci(x, n_resamples=500, seed=rep, method=method)
        covered += low <= 0.3 <= high
    assert 0.90 <= covered / 200 <= 0.99


def test_bca_falls_back_to_percentile_where_undefined():
    """n = 2: the jackknife acceleration is not meaningful, so BCa returns the percentile interval."""
    assert bootstrap_ci([0.0, 1.0], method="bca") == bootstrap_ci([0.0, 1.0])


def test_paired_bootstrap_identical_inputs():
    x = np.random.default_rng(0).random(50)
    out = paired_bootstrap(x, x)
    assert out == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}


def test_paired_bootstrap_clearly_better_b():
    """A right 30% of the time, B 80%: every resample's difference is far from 0, so p hits its floor
    1 / (1 + n_resamples) and the interval excludes 0."""
    rng = np.random.default_rng(0)
    a, b = (rng.random(200) < 0.3).astype(float), (rng.random(200) < 0.8).astype(float)
    out = paired_bootstrap(a, b, n_resamples=1000)
    assert out["diff"] == pytest.approx(b.mean() - a.mean())
    assert out["p_value"] == pytest.approx(1 / 1001)
    assert 0 < out["low"] < out["diff"] < out["high"]
    assert paired_bootstrap(b, a, n_resamples=1000)["diff"] == pytest.approx(-out["diff"])


def test_paired_bootstrap_p_value_agrees_with_normal_theory():
    """Differences ~ N(0.1, 1), n = 400: z = mean / (sd / sqrt(n)), normal two-sided p = 2 * (1 - Phi(|z|)).
    The bootstrap p should be close (within 0.02 absolute) for a sample this large."""
    rng = np.random.default_rng(7)
    a = rng.normal(size=400)
    b = a + rng.normal(loc=0.1, size=400)
    d = b - a
    z = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    p_normal = 2 * (1 - NormalDist().cdf(abs(z)))
    assert paired_bootstrap(a, b, n_resamples=2000)["p_value"] == pytest.approx(p_normal, abs=0.02)


def test_mcnemar_exact_hand_case():
    """b = 10 (A right, B wrong), c = 2: n = 12 < 25 so exact.
    P(X <= 2 | 12, 1/2) = (C(12,0) + C(12,1) + C(12,2)) / 2^12 = (1 + 12 + 66) / 4096 = 79/4096;
    p = 2 * 79/4096 = 0.03857."""
    a = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 3  # plus 5 both-right and 3 both-wrong pairs, which don't count
    b = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 3
    out = mcnemar(a, b)
    assert (out["b"], out["c"], out["method"], out["statistic"]) == (10, 2, "exact", 2.0)
    assert out["p_value"] == pytest.approx(2 * 79 / 4096)
    assert out["p_value"] == pytest.approx(0.0386, abs=5e-5)


def test_mcnemar_chi_square_hand_case():
    """b = 30, c = 10: n = 40 >= 25 so chi-square with continuity correction:
    (|30 - 10| - 1)^2 / 40 = 361/40 = 9.025; p = P(Z^2 >= 9.025) = 2 * (1 - Phi(sqrt(9.025))) ~ 0.00266."""
    a = [True] * 30 + [False] * 10
    b = [False] * 30 + [True] * 10
    out = mcnemar(a, b)
    assert (out["b"], out["c"], out["method"]) == (30, 10, "chi2")
    assert out["statistic"] == pytest.approx(9.025)
    assert out["p_value"] == pytest.approx(2 * (1 - NormalDist().cdf(math.sqrt(9.025))))
    assert out["p_value"] == pytest.approx(0.00266, abs=1e-5)


def test_mcnemar_no_discordant_pairs():
    out = mcnemar([1, 0, 1], [1, 0, 1])
    assert (out["b"], out["c"], out["p_value"]) == (0, 0, 1.0)


def test_sign_test_hand_case():
    """B beats A 7 times, loses once, ties twice: n = 8 non-ties, P(X <= 1) = (1 + 8) / 256,
    p = 2 * 9/256 = 0.0703."""
    a = [1, 1, 1, 1, 1, 1, 1, 5, 3, 3]
    b = [2, 2, 2, 2, 2, 2, 2, 0, 3, 3]
    assert sign_test(a, b) == {"wins": 7, "losses": 1, "ties": 2, "p_value": pytest.approx(18 / 256)}
    assert sign_test([1, 2], [1, 2])["p_value"] == 1.0


def test_binomial_and_chi2_tails():
    """Symmetric case caps at 1; large n stays exact without underflow (0.5 ** 2000 would be 0.0).
    chi2(1) tail at 3.841 is 0.05 (1.96 squared)."""
    assert binomial_two_sided_p(3, 6) == 1.0
    assert binomial_two_sided_p(0, 3) == pytest.approx(2 / 8)
    assert 0.0 < binomial_two_sided_p(900, 2000) < 1e-4
    assert chi2_sf_1dof(1.959963984540054**2) == pytest.approx(0.05)
    assert chi2_sf_1dof(0.0) == 1.0


def test_summarize_format_and_significant():
    out = summarize([1, 0, 1, 1, 0, 1, 1, 0], n_resamples=500)
    assert out["mean"] == 0.625 and out["n"] == 8
    assert out["low"] <= 0.625 <= out["high"]
    assert format_ci(0.625, 0.58, 0.67) == "0.625 [0.58, 0.67]"
    assert format_ci(out["mean"], out["low"], out["high"]).startswith("0.625 [")
    assert significant(0.01) and not significant(0.05) and significant(0.04, alpha=0.05)
    assert not significant(0.02, alpha=0.01)


def test_bootstrap_coverage_skewed_continuous():
    """Exponential(1) (skewness 2), n = 60, true mean 1: 200 seeded data sets. The percentile interval of a
    skewed mean under-covers slightly at this n; BCa corrects part of that. Both should land in 0.90-0.99,
    and an interval built with the wrong centre (shifted by 0.2) must fail the same check."""
    rng = np.random.default_rng(2024)
    data = [rng.exponential(1.0, size=60) for _ in range(200)]
    for method in ("percentile", "bca"):
        hits = [lo <= 1.0 <= hi for rep, x in enumerate(data)
                for _, lo, hi in [bootstrap_ci(x, n_resamples=500, seed=rep, method=method)]]
        assert 0.90 <= np.mean(hits) <= 0.99, (method, np.mean(hits))
    shifted = [lo + 0.2 <= 1.0 <= hi + 0.2 for rep, x in enumerate(data)
               for _, lo, hi in [bootstrap_ci(x, n_resamples=500, seed=rep)]]
    assert np.mean(shifted) < 0.90


def test_paired_bootstrap_interval_covers_true_difference():
    """Paired scores with a shared per-example difficulty (so pairing matters): a = u + e1, b = u + 0.1 + e2,
    n = 80, true mean difference 0.1. Over 200 data sets the 95% interval of B - A holds 0.1 in 0.90-0.99."""
    rng = np.random.default_rng(99)
    hits = []
    for rep in range(200):
        u = rng.normal(size=80)
        a, b = u + 0.3 * rng.normal(size=80), u + 0.1 + 0.3 * rng.normal(size=80)
        out = paired_bootstrap(a, b, n_resamples=500, seed=rep)
        hits.append(out["low"] <= 0.1 <= out["high"])
    assert 0.90 <= np.mean(hits) <= 0.99
