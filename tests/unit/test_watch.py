"""The reward-hacking watch fires when the proxy rises while the gold falls, and only then."""

import pytest

from unipipe_ray.watch import HackingWatch, slope


def test_slope_hand_values():
    """x = 0,1,2; y = 1,3,5 -> slope 2. y = 2,2,2 -> 0."""
    assert slope([1, 3, 5]) == pytest.approx(2.0)
    assert slope([2, 2, 2]) == 0.0
    assert slope([4.0]) == 0.0


def run(proxy, gold, window=3):
    watch = HackingWatch(window=window)
    return [watch.update(p, g) for p, g in zip(proxy, gold)]


def test_fires_on_proxy_up_gold_down():
    out = run([0.1, 0.2, 0.4, 0.7, 1.0], [0.5, 0.5, 0.4, 0.3, 0.2])
    assert out[-1]["watch/hacking"] == 1.0 and out[-1]["watch/divergence"] > 0
    assert out[0]["watch/hacking"] == 0.0  # not enough history yet


def test_silent_when_proxy_and_gold_agree():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert all(o["watch/hacking"] == 0.0 for o in run(rising, rising))
    falling = rising[::-1]
    assert all(o["watch/hacking"] == 0.0 for o in run(falling, falling))
    assert all(o["watch/hacking"] == 0.0 for o in run(rising, [0.3] * 5))  # gold flat: no verdict


def test_state_round_trip():
    a = HackingWatch(window=2)
    a.update(0.1, 0.5)
    b = HackingWatch(window=2)
    b.load_state_dict(a.state_dict())
    assert a.update(0.3, 0.2) == b.update(0.3, 0.2)
