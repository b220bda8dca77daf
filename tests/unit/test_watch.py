"""The reward-hacking watch fires when the proxy rises while the gold falls, and only then."""

import pytest

from unipipe_ray.core.watch import HackingWatch, change_z, slope


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


def test_change_z_hand_value():
    """Halves [0.2, 0.2] vs [0.6, 0.6], std 0.4, 10 samples each: pooled means 0.2 / 0.6, variances 0.16,
    se = sqrt(0.16/20 + 0.16/20) = 0.1265, z = 0.4 / 0.1265 = 3.162."""
    assert change_z([0.2, 0.2, 0.6, 0.6], [0.4] * 4, [10] * 4) == pytest.approx(0.4 / (0.32 / 20) ** 0.5)
    assert change_z([0.5] * 4, [0.0] * 4, [8] * 4) == 0.0


def test_with_sample_statistics_noise_does_not_fire_but_a_clear_divergence_does():
    """The quickstart case that fired on slopes alone: gold 0.34, 0.72, 0.19 on 32 samples (std ~0.45) is
    noise; a proxy climbing from 0.1 to 0.9 while gold drops from 0.8 to 0.1 on 64 samples is not."""
    noisy = HackingWatch(window=3)
    outs = [noisy.update(p, g, 0.55, 0.45, 32) for p, g in [(-0.26, 0.34), (0.04, 0.72), (-0.13, 0.19)]]
    assert outs[-1]["watch/hacking"] == 0.0
    clear = HackingWatch(window=4)
    pairs = [(0.1, 0.8), (0.3, 0.7), (0.7, 0.3), (0.9, 0.1)]
    outs = [clear.update(p, g, 0.3, 0.3, 64) for p, g in pairs]
    assert outs[-1]["watch/hacking"] == 1.0 and outs[-1]["watch/proxy_z"] > 2 and outs[-1]["watch/gold_z"] < -2
    agree = HackingWatch(window=4)
    outs = [agree.update(p, p, 0.3, 0.3, 64) for p, _ in pairs]
    assert all(o["watch/hacking"] == 0.0 for o in outs)


def test_state_round_trip_with_statistics():
    a = HackingWatch(window=2)
    a.update(0.1, 0.5, 0.2, 0.2, 16)
    b = HackingWatch(window=2)
    b.load_state_dict(a.state_dict())
    assert a.update(0.9, 0.1, 0.2, 0.2, 16) == b.update(0.9, 0.1, 0.2, 0.2, 16)
