import math

import pytest
import torch

from unipipe_ray.core.losses import (
    bradley_terry_loss,
    dpo_loss,
    masked_mean,
    masked_sum,
    ppo_policy_loss,
    reduce_loss,
    sft_loss,
    simpo_loss,
    value_loss,
)

LN2 = math.log(2)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_masked_sum_and_mean_hand_values():
    """values [[1, 2, inf], [4, 0, 0]], mask [[1, 1, 0], [1, 0, 0]]: sum 1+2+4 = 7, mean 7/3;
    per row sums [3, 4], means [1.5, 4]. The masked inf must not leak in."""
    values = torch.tensor([[1.0, 2.0, math.inf], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_sum(values, mask).item() == 7.0
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(masked_sum(values, mask, dim=-1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 4.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_reduce_loss_hand_values():
    """per-token [[1, 2, 3], [4, 9, 9]], mask [[1, 1, 1], [1, 0, 0]].
    token: (1+2+3+4)/4 = 2.5; with normalizer 5: 10/5 = 2.
    sequence: (mean(1, 2, 3) + mean(4)) / 2 = (2 + 4) / 2 = 3; with normalizer 4: 6/4 = 1.5."""
    per_token = torch.tensor([[1.0, 2, 3], [4, 9, 9]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert reduce_loss(per_token, mask).item() == 2.5
    assert reduce_loss(per_token, mask, normalizer=5).item() == 2.0
    assert reduce_loss(per_token, mask, mode="sequence").item() == 3.0
    assert reduce_loss(per_token, mask, mode="sequence", normalizer=4).item() == 1.5
    with pytest.raises(ValueError):
        reduce_loss(per_token, mask, mode="batch")


def test_reduce_loss_per_example_and_its_shards():
    """example: one loss per pair, [1, 2, 3, 6] -> 12 / 4 = 3; two shards passing normalizer 4 / 2 average to it."""
    losses = torch.tensor([1.0, 2, 3, 6])
    assert reduce_loss(losses, mode="example").item() == 3.0
    assert reduce_loss(losses, mode="example", normalizer=3).item() == 4.0
    shards = [reduce_loss(part, mode="example", normalizer=2) for part in (losses[:1], losses[1:])]
    assert (sum(shards) / 2).item() == 3.0


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_reduce_loss_two_uneven_shards_average_to_global(mode):
    """Shard A: 2 sequences, 4 real tokens; shard B: 3 sequences, 9 real tokens. Each shard passes
    normalizer = global count / 2 (13/2 tokens or 5/2 sequences); the mean of the two shard losses
    (DDP's gradient average) equals the reduction over the concatenated batch, values and grads."""
    gen = torch.Generator().manual_seed(0)
    per_token = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 1, 4, 2, 3])
    mask = torch.arange(4) < lengths[:, None]
    shards = [(per_token[:2], mask[:2]), (per_token[2:], mask[2:])]
    global_count = mask.sum() if mode == "token" else mask.shape[0]

    expected = reduce_loss(per_token, mask, mode=mode)
    shard_losses = [reduce_loss(v, m, mode=mode, normalizer=global_count / 2) for v, m in shards]
    averaged = sum(shard_losses) / 2
    torch.testing.assert_close(averaged, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(averaged, per_token)
    (expected_grad,) = torch.autograd.grad(expected, per_token)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    # without the normalizer the shard means weigh shard A's 4 tokens like shard B's 9: not global
    naive = sum(reduce_loss(v, m, mode=mode) for v, m in shards) / 2
    assert not torch.isclose(naive, expected)


def test_sft_loss_hand_value():
    """logps [[-1, -3], [-2, 0]], mask [[1, 1], [1, 0]]: token NLL (1+3+2)/3 = 2;
    sequence NLL (mean(1, 3) + 2) / 2 = 2 too; with logps [[-1, -3], [-4, 0]] token 8/3, sequence 3."""
    mask = torch.tensor([[True, True], [True, False]])
    first = torch.tensor([[-1.0, -3], [-2, 0]])
    assert sft_loss(first, mask).item() == 2.0
    assert sft_loss(first, mask, mode="sequence").item() == 2.0
    logps = torch.tensor([[-1.0, -3], [-4, 0]])
    assert sft_loss(logps, mask).item() == pytest.approx(8 / 3)
    assert sft_loss(logps, mask, mode="sequence").item() == 3.0


def test_bradley_terry_hand_values():
    """r_c = [2, 0], r_r = [1, 0.5]: -log σ(1) = 0.3133, -log σ(-0.5) = 0.9741; accuracies [1, 0].
    With margin 1 on the first pair: -log σ(0) = ln 2."""
    losses, accuracies = bradley_terry_loss(t(2, 0), t(1, 0.5))
    torch.testing.assert_close(losses, t(0.31326168751822286, 0.9740769841801067))
    assert accuracies.tolist() == [1.0, 0.0]
    losses, _ = bradley_terry_loss(t(2, 0), t(1, 0.5), margin=t(1, 0))
    assert losses[0].item() == pytest.approx(LN2)


def test_dpo_sigmoid_hand_value():
    """beta = 0.5, pc = -1, rc = -2, pr = -3, rr = -2: h = (-1 - (-2)) - (-3 - (-2)) = 2,
    loss = -log σ(1) = 0.3133; chosen reward 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(t(-1), t(-3), t(-2), t(-2), beta=0.5)
    torch.testing.assert_close(losses, t(0.31326168751822286))
    torch.testing.assert_close(chosen_rewards, t(0.5))
    torch.testing.assert_close(rejected_rewards, t(-0.5))


def test_cdpo_and_ipo_hand_values():
    """Same pair (h = 2, beta = 0.5). cDPO eps = 0.1: 0.9 * -log σ(1) + 0.1 * -log σ(-1)
    = 0.9 * 0.3133 + 0.1 * 1.3133 = 0.4133. IPO: (2 - 1/(2 * 0.5))^2 = (2 - 1)^2 = 1."""
    losses, _, _ = dpo_loss(t(-1), t(-3), t(-2), t(-2), beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(losses, t(0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228))
    losses, _, _ = dpo_loss(t(-1), t(-3), t(-2), t(-2), beta=0.5, loss_type="ipo")
    torch.testing.assert_close(losses, t(1.0))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_at_reference_is_ln2_and_ipo_is_quarter_over_beta_squared(beta):
    """policy == reference gives h = 0: sigmoid and cDPO give ln 2, IPO gives (1/(2 beta))^2; rewards 0."""
    logps = t(-5.0, -12.5, -0.25)
    other = t(-7.0, -3.0, -1.5)
    for label_smoothing in (0.0, 0.2):
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps, other, logps, other, beta, label_smoothing=label_smoothing
        )
        torch.testing.assert_close(losses, torch.full_like(losses, LN2))
        assert chosen_rewards.abs().sum() == 0 and rejected_rewards.abs().sum() == 0
    losses, _, _ = dpo_loss(logps, other, logps, other, beta, loss_type="ipo")
    torch.testing.assert_close(losses, torch.full_like(losses, 1 / (4 * beta**2)))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    """At policy == reference, d loss / d pc = -beta/2 < 0 and d loss / d pr = +beta/2 > 0."""
    chosen, rejected = t(-4.0).requires_grad_(), t(-6.0).requires_grad_()
    losses, chosen_rewards, _ = dpo_loss(chosen, rejected, t(-4.0), t(-6.0), beta=0.1)
    grad_chosen, grad_rejected = torch.autograd.grad(losses.sum(), (chosen, rejected))
    torch.testing.assert_close(grad_chosen, t(-0.05))
    torch.testing.assert_close(grad_rejected, t(0.05))
    assert not chosen_rewards.requires_grad


def test_dpo_rejects_bad_arguments():
    args = (t(-1), t(-3), t(-2), t(-2), 0.5)
    with pytest.raises(ValueError):
        dpo_loss(*args, loss_type="hinge_typo")
    for label_smoothing in (-0.1, 0.5):
        with pytest.raises(ValueError):
            dpo_loss(*args, label_smoothing=label_smoothing)
    with pytest.raises(ValueError):
        dpo_loss(*args, loss_type="ipo", label_smoothing=0.1)


def test_simpo_hand_value():
    """beta = 2, gamma = 1, length-normalised c = -0.5, r = -1: 2 * (-0.5 - (-1)) - 1 = 0 -> ln 2;
    c = -0.5, r = -2: 2 * 1.5 - 1 = 2 -> -log σ(2) = 0.1269. Rewards beta c = -1, beta r = -2 / -4."""
    chosen = t(-0.5, -0.5).requires_grad_()
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, t(-1, -2), beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses, t(LN2, 0.12692801104297263))
    torch.testing.assert_close(chosen_rewards, t(-1, -1))
    torch.testing.assert_close(rejected_rewards, t(-2, -4))
    assert not chosen_rewards.requires_grad


def test_ppo_policy_loss_hand_values():
    """eps = 0.2. Token 1: A = 1, ratio = e^0.5 = 1.6487: max(-1.6487, -1.2) = -1.2, clipped.
    Token 2: A = -1, ratio = 1.6487: max(1.6487, 1.2) = 1.6487, not clipped (pessimistic bound).
    Token 3: A = 2, ratio = 1: max(-2, -2) = -2, not clipped. Token 4: A = -1, ratio = e^-0.5 = 0.6065:
    max(0.6065, 0.8) = 0.8, clipped."""
    logps = t(0.5, 0.5, 0.0, -0.5).unsqueeze(0)
    old_logps = torch.zeros_like(logps)
    advantages = t(1.0, -1.0, 2.0, -1.0).unsqueeze(0)
    losses, clipped = ppo_policy_loss(logps, old_logps, advantages, clip_eps=0.2)
    torch.testing.assert_close(losses, t(-1.2, math.exp(0.5), -2.0, 0.8).unsqueeze(0))
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_ppo_gradient_is_zero_on_clipped_tokens():
    """Clipped tokens contribute no gradient; the others get d(-A ratio)/d logps = -A ratio."""
    logps = t(0.5, 0.5, 0.0, -0.5).unsqueeze(0).requires_grad_()
    advantages = t(1.0, -1.0, 2.0, -1.0).unsqueeze(0)
    losses, clipped = ppo_policy_loss(logps, torch.zeros_like(logps), advantages, clip_eps=0.2)
    (grad,) = torch.autograd.grad(losses.sum(), logps)
    torch.testing.assert_close(grad, t(0.0, math.exp(0.5), -2.0, 0.0).unsqueeze(0))
    assert torch.all(grad[clipped.bool()] == 0)


def test_value_loss_hand_values():
    """eps = 0.2. v = 1.5, old = 1, R = 2: (1.5-2)^2 = 0.25, clipped v = 1.2: (1.2-2)^2 = 0.64 -> 0.5 * 0.64
    = 0.32. v = 1.1, old = 1, R = 0: inside the clip range, 0.5 * 1.21 = 0.605. v = 0, old = 1, R = 0:
    unclipped 0, clipped v = 0.8: 0.64 -> 0.32."""
    losses = value_loss(t(1.5, 1.1, 0.0), t(1.0, 1.0, 1.0), t(2.0, 0.0, 0.0), clip_eps=0.2)
    torch.testing.assert_close(losses, t(0.32, 0.605, 0.32))
