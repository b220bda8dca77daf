"""One PPO batch's rewards and advantages: pure functions of tensors and the config (no Ray).

Reward per sequence = reward model + ``gold_reward_weight`` x the task's checker + a rule reward - a penalty for
a missing EOS. Advantages: ``gae`` (critic + GAE, Ouyang et al. 2022), ``grpo`` (Shao et al. 2024) or ``rloo``
(Ahmadian et al. 2024), the last two without a critic; the KL penalty to the reference is per token.
"""

from __future__ import annotations

import torch

from unipipe_ray.config import ConfigError, PPOConfig
from unipipe_ray.core.rl import gae, grpo_advantages, masked_whiten, rloo_advantages


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack (R_i,) rows (or (n, R_i) blocks) into (N, width), zero-padded."""
    blocks = [r.unsqueeze(0) if r.dim() == 1 else r for r in rows]
    out = torch.zeros(sum(b.shape[0] for b in blocks), width)
    i = 0
    for b in blocks:
        out[i:i + b.shape[0], :b.shape[1]] = b[:, :width]
        i += b.shape[0]
    return out


def scalar_rewards(cfg: PPOConfig, proxy: list[float], gold: list[float], rule: list[float],
                   finished: list[bool]) -> torch.Tensor:
    """Per-sequence reward: reward model + weighted gold reward + rule reward - penalty for a missing EOS."""
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float32)
    r = as_tensor(proxy) + cfg.gold_reward_weight * as_tensor(gold) + as_tensor(rule)
    return r - cfg.missing_eos_penalty * (1.0 - as_tensor([float(f) for f in finished]))


def load_rule(spec: str | None, key: str = "rule_reward"):
    """Import a rule reward "module:function" (called as f(example, text, response_ids) -> float).

    The config names code that runs in this process: configs are trusted input (docs/reliability.md).
    run_ppo resolves both rules before any actor starts, so a typo stops the stage with the key's name."""
    if spec is None:
        return None
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(key, f"{spec!r} must look like module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(key, f"cannot load {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(key, f"{spec!r} is not callable")
    return fn


def gold_scorer(cfg: PPOConfig, task):
    """The gold reward f(example, text, response_ids): cfg.gold_rule, else the task's checker, else None."""
    if cfg.gold_rule:
        return load_rule(cfg.gold_rule, "gold_rule")
    if task is not None and task.has_gold_reward:
        return lambda example, text, response_ids: task.gold_reward(example, text)
    return None


def advantages_and_returns(cfg: PPOConfig, rewards: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                           values: torch.Tensor | None, mask: torch.Tensor) -> tuple:
    """(advantages (N, R), returns (N, R) or None). GAE puts -kl_coef*KL on every token and the sequence
    reward on the last one; GRPO/RLOO subtract the KL sum from the sequence reward and use a group baseline."""
    if cfg.estimator == "gae":
        token_rewards = -kl_coef * kl
        last = mask.sum(1).clamp(min=1) - 1
        token_rewards[torch.arange(len(last)), last] += rewards
        advantages, returns = gae(token_rewards * mask, values, mask, cfg.gamma, cfg.lam)
    else:
        total = rewards - kl_coef * (kl * mask).sum(1)
        fn = grpo_advantages if cfg.estimator == "grpo" else rloo_advantages
        advantages, returns = fn(total, cfg.samples_per_prompt).unsqueeze(1).expand_as(mask).clone(), None
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages * mask, returns
