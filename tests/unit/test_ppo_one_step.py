"""PPO's cheaper iteration: no separate old-log-prob forward when the update is one step over every sample,
the KL to the reference in the loss (kl_in: loss), and the free engine-vs-trainer check on the rollouts' own
log-probs. The trainer and the HF engine run in-process on the tiny Llama (no Ray)."""

import pytest
import torch

from tests.floors import LOGP_ATOL
from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.core.rl import kl_penalty, logp_gap, old_logps_needed
from unipipe_ray.ppo import roles
from unipipe_ray.ppo.rewards import pad_rows
from unipipe_ray.ppo.rollout import RolloutWorker

CPU = torch.device("cpu")
LR = 1e-2


def test_logp_gap_compares_only_the_sampled_tokens():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    assert logp_gap([[-1.0, -2.0, -3.0], [-0.5]], trainer, mask) == 0.0
    assert logp_gap([[-1.0, -2.5, -3.0], [-0.25]], trainer, mask) == pytest.approx(0.5)
    assert logp_gap([[-1.0, -2.0, -3.0], [-0.5]], trainer, mask.logical_and(torch.tensor([[1, 0, 1], [1, 0, 0]])
                                                                          .bool())) == 0.0
    assert logp_gap([], trainer[:0], mask[:0]) == 0.0


@pytest.mark.parametrize("epochs, minibatch, shards, kl_in_reward, needed", [
    (1, 32, [32], False, False),      # one step over everything: the training forward has them
    (1, 32, [16, 16], False, False),  # per worker
    (1, 16, [32], False, True),       # two steps: the second minibatch sees an updated policy
    (2, 32, [32], False, True),       # a second epoch, likewise
    (1, 32, [32], True, True),        # the KL in the reward is needed before the update
])
def test_old_logps_needed(epochs, minibatch, shards, kl_in_reward, needed):
    assert old_logps_needed(epochs, minibatch, shards, kl_in_reward) is needed


@pytest.fixture(scope="module")
def rollouts():
    """Samples from the HF engine on the tiny model's initial weights, with their engine log-probs."""
    worker = RolloutWorker("hf", str(tiny_model_dir()), device=CPU)
    return worker.generate([[5, 6, 7, 8], [9, 10], [11, 12, 13]], 2, 6, seed=3)


def _trainer():
    return roles.PolicyTrainer(str(tiny_model_dir()), lr=LR, pad_id=0, temperature=1.0, clip_eps=0.2, device=CPU,
                               seed=1)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}


@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_one_step_without_old_logps_equals_the_update_with_them(rollouts, kl_coef):
    """The same step either way: old log-probs from a forward of their own, or the training forward's own
    detached ones; with the KL in the loss too. The free check on the rollouts' log-probs passes."""
    n = len(rollouts)
    width = max(len(s.response_ids) for s in rollouts)
    advantages = pad_rows([torch.full((len(s.response_ids),), (-1.0) ** i) for i, s in enumerate(rollouts)], width)
    with_old, without = _trainer(), _trainer()
    old = with_old.logps(rollouts)
    ref = old - 0.1 * torch.arange(width).float()  # a reference the policy has drifted from
    kl = (ref, kl_coef, "k3")
    a = with_old.update(rollouts, old, advantages, 1, n, 0, *kl)
    b = without.update(rollouts, None, advantages, 1, n, 0, *kl)
    assert a["ppo/policy_loss"] == pytest.approx(b["ppo/policy_loss"], abs=1e-6)
    assert a["ppo/kl_in_loss"] == pytest.approx(b["ppo/kl_in_loss"], rel=1e-5)
    assert a["ppo/grad_norm"] == pytest.approx(b["ppo/grad_norm"], rel=1e-5)
    # Adam's first step is about lr * sign(gradient), so where a gradient is near 0 float noise moves it: the
    # separate forward saw the samples in another order than the shuffled minibatch, and with 2 threads the
    # matmuls then round differently (1e-6 in the log-probs; up to 1% of a step in a few weights here)
    wa, wb = _weights(with_old), _weights(without)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 0.02 * LR
    assert b["ppo/rollout_logp_max_diff"] < LOGP_ATOL  # the engine sampled with the trainer's weights
    # by hand: at ratio 1 the token loss is -A + kl_coef * k3(logp, ref), averaged over the response tokens
    mask = pad_rows([torch.ones(len(s.response_ids)) for s in rollouts], width).bool()
    expected = ((-advantages + kl_coef * kl_penalty(old, ref, "k3")) * mask).sum() / mask.sum()
    assert b["ppo/policy_loss"] == pytest.approx(float(expected), abs=1e-5)


def test_the_kl_in_the_loss_moves_the_update(rollouts):
    n, width = len(rollouts), max(len(s.response_ids) for s in rollouts)
    advantages = torch.zeros(n, width)  # only the KL term pulls
    plain, pulled = _trainer(), _trainer()
    ref = plain.logps(rollouts) - 1.0
    plain.update(rollouts, None, advantages, 1, n, 0, ref, 0.0, "k3")
    pulled.update(rollouts, None, advantages, 1, n, 0, ref, 0.5, "k3")
    w0, w1 = _weights(plain), _weights(pulled)
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 1e-4


def test_the_free_check_sees_stale_engine_weights(rollouts):
    """Trainer one step ahead of the engine that sampled: the rollouts' log-probs no longer match."""
    n, width = len(rollouts), max(len(s.response_ids) for s in rollouts)
    trainer = _trainer()
    advantages = torch.randn(n, width, generator=torch.Generator().manual_seed(0))
    trainer.update(rollouts, None, advantages, 1, n, 0)
    out = trainer.update(rollouts, None, advantages, 1, n, 1)
    assert out["ppo/rollout_logp_max_diff"] > 100 * LOGP_ATOL


def test_an_update_without_old_logps_refuses_several_steps(rollouts):
    n, width = len(rollouts), max(len(s.response_ids) for s in rollouts)
    with pytest.raises(ValueError, match="one epoch over one minibatch"):
        _trainer().update(rollouts, None, torch.zeros(n, width), 1, n // 2, 0)
    with pytest.raises(ValueError, match="one epoch over one minibatch"):
        _trainer().update(rollouts, None, torch.zeros(n, width), 2, n, 0)
