import math

import pytest
import torch

from unipipe_ray.core.rl import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_whiten,
    rloo_advantages,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_kl_penalty_hand_values():
    """logps = -1, ref = -2 (log r = 1): k1 = 1, k2 = 0.5 * 1 = 0.5, k3 = e^-1 + 1 - 1 = 0.3679.
    logps = -2, ref = -1 (log r = -1): k1 = -1, k2 = 0.5, k3 = e + (-1) - 1 = 0.7183."""
    logps, ref_logps = t(-1, -2), t(-2, -1)
    torch.testing.assert_close(kl_penalty(logps, ref_logps), t(1, -1))
    torch.testing.assert_close(kl_penalty(logps, ref_logps, "k2"), t(0.5, 0.5))
    torch.testing.assert_close(kl_penalty(logps, ref_logps, "k3"), t(math.exp(-1), math.e - 2))
    with pytest.raises(ValueError):
        kl_penalty(logps, ref_logps, "k4")


def test_kl_penalty_invariants():
    """All estimators are 0 when policy == ref; k2 and k3 are never negative."""
    gen = torch.Generator().manual_seed(0)
    logps, ref_logps = -torch.rand(2, 50, generator=gen) * 5, -torch.rand(2, 50, generator=gen) * 5
    for estimator in ("k1", "k2", "k3"):
        assert kl_penalty(logps, logps, estimator).abs().max() == 0
    assert kl_penalty(logps, ref_logps, "k2").min() >= 0
    assert kl_penalty(logps, ref_logps, "k3").min() >= 0


def test_gae_hand_value():
    """gamma = 0.9, lam = 0.8, rewards [0, 1, pad], values [0.5, 0.8, 7 (pad, ignored)].
    t=1: delta = 1 + 0.9 * 0 - 0.8 = 0.2 (episode ends), A_1 = 0.2, R_1 = 1.0.
    t=0: delta = 0 + 0.9 * 0.8 - 0.5 = 0.22, A_0 = 0.22 + 0.9 * 0.8 * 0.2 = 0.364, R_0 = 0.864."""
    rewards, values = t(0.0, 1.0, 3.0).unsqueeze(0), t(0.5, 0.8, 7.0).unsqueeze(0)
    mask = torch.tensor([[True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, t(0.364, 0.2, 0.0).unsqueeze(0))
    torch.testing.assert_close(returns, t(0.864, 1.0, 0.0).unsqueeze(0))


def _naive_gae(rewards, values, lengths, gamma, lam):
    """Textbook double loop in Python floats: A_t = sum_l (gamma lam)^l delta_{t+l} within the episode."""
    advantages, returns = [], []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        row = []
        for t_ in range(len(r)):
            total = 0.0
            for step in range(t_, n):
                next_value = v[step + 1] if step + 1 < n else 0.0
                delta = r[step] + gamma * next_value - v[step]
                total += (gamma * lam) ** (step - t_) * delta
            row.append(total)
        advantages.append(row)
        returns.append([a + (v[i] if i < n else 0.0) for i, a in enumerate(row)])
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_equals_naive_loop_on_right_padded_batch(gamma, lam):
    """Random rewards/values, 5 responses of lengths 7, 1, 4, 0, 6 padded to 7 (padding holds junk)."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    values = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    lengths = [7, 1, 4, 0, 6]
    mask = torch.arange(7) < torch.tensor(lengths)[:, None]
    advantages, returns = gae(rewards, values.requires_grad_(), mask, gamma, lam)
    expected_advantages, expected_returns = _naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-12, atol=1e-12)
    assert not advantages.requires_grad and not returns.requires_grad


def test_masked_whiten_hand_values():
    """values [1, 2, 3, 100 (masked)]: mean 2, unbiased var ((1 + 0 + 1) / 2) = 1, so whitened
    [-1, 0, 1, 0]; shift_mean=False adds the mean back: [1, 2, 3, 0]."""
    values = t(1.0, 2.0, 3.0, 100.0).unsqueeze(0)
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(masked_whiten(values, mask), t(-1.0, 0.0, 1.0, 0.0).unsqueeze(0))
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), t(1.0, 2.0, 3.0, 0.0).unsqueeze(0)
    )


def test_masked_whiten_gives_zero_mean_unit_variance():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 3 + 5
    mask = torch.arange(9) < torch.tensor([9, 2, 5, 7])[:, None]
    whitened = masked_whiten(values, mask)
    real = whitened[mask]
    assert abs(real.mean().item()) < 1e-12
    assert real.var().item() == pytest.approx(1.0, abs=1e-7)
    assert torch.all(whitened[~mask] == 0)


def test_grpo_advantages_hand_values():
    """group_size 4. Group 1 rewards [1, 0, 0, 0]: mean 0.25, unbiased std
    sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5, so [1.5, -0.5, -0.5, -0.5] (1e-6 in the std).
    Group 2 all 1: centred 0, std 0 -> 0. Unscaled group 1: [0.75, -0.25, -0.25, -0.25]."""
    rewards = t(1, 0, 0, 0, 1, 1, 1, 1)
    expected = t(1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0) * 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(grpo_advantages(rewards, 4), expected)
    torch.testing.assert_close(
        grpo_advantages(rewards, 4, scale=False), t(0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0)
    )
    with pytest.raises(ValueError):
        grpo_advantages(rewards, 3)
    with pytest.raises(ValueError):
        grpo_advantages(rewards, 1)


def test_rloo_advantages_hand_values():
    """group_size 4, rewards [1, 0, 0, 0]: 1 - mean(0, 0, 0) = 1; 0 - mean(1, 0, 0) = -1/3 each.
    Group [2, 4]: 2 - 4 = -2, 4 - 2 = 2 (group_size 2)."""
    torch.testing.assert_close(rloo_advantages(t(1, 0, 0, 0), 4), t(1, -1 / 3, -1 / 3, -1 / 3))
    torch.testing.assert_close(rloo_advantages(t(2, 4, 0, 0), 2), t(-2, 2, 0, 0))
    with pytest.raises(ValueError):
        rloo_advantages(t(1, 0, 0), 2)
    with pytest.raises(ValueError):
        rloo_advantages(t(1, 0, 0), 1)


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=64)
    assert controller.value == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05


def test_adaptive_kl_controller_hand_values_and_direction():
    """init 0.1, target 6, horizon 10000, n_steps 100.
    KL 12: error = clip(12/6 - 1, -0.2, 0.2) = 0.2, value = 0.1 * (1 + 0.2 * 100/10000) = 0.1002 (up).
    KL 5.7: error = -0.05, value = 0.1002 * (1 - 0.05 * 0.01) = 0.10014990 (down)."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=100)
    assert controller.value == pytest.approx(0.1002)
    controller.update(current_kl=torch.tensor(5.7), n_steps=100)
    assert controller.value == pytest.approx(0.1002 * (1 - 0.0005))
    assert isinstance(controller.value, float)
    restored = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    restored.update(current_kl=6.0, n_steps=100)  # on target: no change
    assert restored.value == controller.value
