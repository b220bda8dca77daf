"""PPO controller arithmetic: sequence rewards, where the reward lands, group advantages, row padding,
and the per-response-token views of model outputs."""

import pytest
import torch

from unipipe_ray.config import ConfigError, PPOConfig, load_config
from unipipe_ray.core.logps import sequence_logps, token_logps
from unipipe_ray.core.sequences import response_grid_logps, to_batch
from unipipe_ray.ppo.rewards import advantages_and_returns, load_rule, pad_rows, scalar_rewards
from unipipe_ray.ppo.rollout import Sample
from unipipe_ray.runtime.actors import split


def cfg(**kw):
    return load_config(PPOConfig, overrides=[f"{k}={v}" for k, v in kw.items()])


def test_scalar_rewards_hand_values():
    """proxy 1.0 + 0.5 * gold 1 + rule 0.25 - eos penalty 2 (unfinished) = -0.25; finished: 1.75."""
    c = cfg(gold_reward_weight=0.5, missing_eos_penalty=2.0)
    r = scalar_rewards(c, [1.0, 1.0], [1.0, 1.0], [0.25, 0.25], [False, True])
    assert r.tolist() == pytest.approx([-0.25, 1.75])


def test_gae_puts_the_sequence_reward_on_the_last_real_token():
    """gamma = lam = 1, values 0, no KL: every token's advantage is the sequence reward (then masked)."""
    c = cfg(estimator="gae", gamma=1.0, lam=1.0, whiten_advantages=False)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = advantages_and_returns(c, torch.tensor([2.0, -1.0]), torch.zeros(2, 3), 0.1, torch.zeros(2, 3), mask)
    assert adv.tolist() == [[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]
    assert ret.tolist() == [[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]


def test_gae_kl_penalty_per_token():
    """kl_coef 0.5, KL 1 on token 0 only, reward 0, gamma=lam=1: advantages [-0.5, 0]."""
    c = cfg(estimator="gae", gamma=1.0, lam=1.0, whiten_advantages=False)
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv, _ = advantages_and_returns(c, torch.zeros(1), torch.tensor([[1.0, 0.0]]), 0.5, torch.zeros(1, 2), mask)
    assert adv.tolist() == [[-0.5, 0.0]]


def test_rloo_and_grpo_broadcast_a_group_baseline():
    """Two prompts x 2 samples, rewards [1, 0 | 3, 3]; RLOO: r_i - other sample = [1, -1, 0, 0]."""
    c = cfg(estimator="rloo", samples_per_prompt=2, whiten_advantages=False)
    mask = torch.ones(4, 3, dtype=torch.bool)
    adv, ret = advantages_and_returns(c, torch.tensor([1.0, 0.0, 3.0, 3.0]), torch.zeros(4, 3), 0.0, None, mask)
    assert ret is None and adv[:, 0].tolist() == [1.0, -1.0, 0.0, 0.0] and (adv[:, 1] == adv[:, 0]).all()
    c = cfg(estimator="grpo", samples_per_prompt=2, whiten_advantages=False)
    adv, _ = advantages_and_returns(c, torch.tensor([1.0, 0.0, 3.0, 3.0]), torch.zeros(4, 3), 0.0, None, mask)
    assert adv[0, 0] > 0 > adv[1, 0] and adv[2, 0] == adv[3, 0] == 0


def test_group_estimators_need_two_samples():
    with pytest.raises(ValueError, match="samples_per_prompt: grpo needs >= 2 samples"):
        cfg(estimator="grpo", samples_per_prompt=1)


def test_pad_rows_and_split():
    out = pad_rows([torch.tensor([1.0, 2.0]), torch.tensor([[3.0], [4.0]])], 3)
    assert out.tolist() == [[1, 2, 0], [3, 0, 0], [4, 0, 0]]
    assert split(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert split([1], 3) == [[1], [], []]


def test_rule_reward_spec():
    assert load_rule("tests.ray.rules:low_id_share")(None, "", [1, 60000]) == 0.5
    with pytest.raises(ValueError, match="module:function"):
        load_rule("tests.ray.rules")
    # a typo or a non-function is a config error naming the key, raised before any actor starts
    with pytest.raises(ConfigError, match="gold_rule: cannot load 'tests.ray.rules:nope': AttributeError"):
        load_rule("tests.ray.rules:nope", "gold_rule")
    with pytest.raises(ConfigError, match="rule_reward: cannot load 'no_such_module:f': ModuleNotFoundError"):
        load_rule("no_such_module:f")
    with pytest.raises(ConfigError, match="is not callable"):
        load_rule("tests.floors:LOGP_ATOL")


def test_response_logps_equal_the_stage_logps():
    """The (N, R) response view matches token_logps over the same rows with prompt tokens masked."""
    torch.manual_seed(0)
    samples = [Sample([5, 6, 7], [8, 9], [0.0, 0.0], True), Sample([5], [1, 2, 3], [0.0] * 3, False)]
    batch = to_batch(samples, pad_id=0)  # left-padded: both rows end in the last column
    width = batch["input_ids"].shape[1]
    logits = torch.randn(2, width, 11)
    labels = batch["input_ids"].clone()
    for i, s in enumerate(samples):  # only response tokens count
        labels[i, :width - len(s.response_ids)] = -100
    ref = sequence_logps(*token_logps(logits, labels))
    ours = response_grid_logps(logits, batch)  # all positions kept
    assert ours.sum(1).tolist() == pytest.approx(ref.tolist(), abs=1e-5)
    assert ours[0, 2] == 0  # masked beyond the 2-token response
    kept = response_grid_logps(logits[:, -(3 + 1):], batch)  # only the last R + 1 positions, as the trainer runs it
    assert torch.equal(kept, ours)
