"""budget_split: sizes, disjointness, determinism, the r = 0 and r = 1 ends, nesting, validation."""
import pytest

from unipipe_ray.data import budget_split


@pytest.mark.parametrize("budget, ratio, n_sft", [(100, 0.25, 25), (10, 0.25, 3), (7, 0.5, 4), (50, 0.0, 0),
                                                  (50, 1.0, 50)])
def test_sizes_and_disjoint(budget, ratio, n_sft):
    sft, pref = budget_split(200, budget, ratio, seed=0)
    assert (len(sft), len(pref)) == (n_sft, budget - n_sft)
    assert not set(sft) & set(pref) and len(set(sft) | set(pref)) == budget
    assert all(0 <= i < 200 for i in sft + pref)


def test_seed_determinism():
    assert budget_split(1000, 100, 0.3, seed=1) == budget_split(1000, 100, 0.3, seed=1)
    assert budget_split(1000, 100, 0.3, seed=1) != budget_split(1000, 100, 0.3, seed=2)


def test_smaller_budget_nests_in_larger_one():
    small, large = budget_split(500, 50, 0.5, 0), budget_split(500, 200, 0.5, 0)
    assert set(small[0] + small[1]) <= set(large[0] + large[1])


def test_whole_pool():
    sft, pref = budget_split(10, 10, 0.5, seed=0)
    assert sorted(sft + pref) == list(range(10))


@pytest.mark.parametrize("pool, budget, ratio, message", [
    (10, 11, 0.5, "exceeds the pool of 10"), (10, 0, 0.5, "budget must be an int >= 1"),
    (10, 5, 1.5, r"sft_ratio must be in \[0, 1\]"), (10, 5, -0.1, "sft_ratio")])
def test_validation(pool, budget, ratio, message):
    with pytest.raises(ValueError, match=message):
        budget_split(pool, budget, ratio, seed=0)
