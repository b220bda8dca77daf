"""RL pieces for PPO / GRPO / RLOO: KL penalties, GAE, whitening, group baselines, KL controllers.

Pure functions of tensors plus two plain controller classes with state_dict()/load_state_dict().
Imports only torch: the math modules never pull in ray, deepspeed, vllm or transformers.
"""

import torch

from unipipe_ray.core.losses import masked_mean, masked_sum

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logps, ref_logps, estimator="k1"):
    """Per-token estimate of KL(policy || ref) from sampled tokens' log-probs (Schulman 2020,
    "Approximating KL Divergence"). logps, ref_logps (B, T) -> (B, T).

    k1 = log r with log r = logps - ref_logps (unbiased, high variance, can be negative);
    k2 = 0.5 (log r)^2; k3 = exp(-log r) + log r - 1 (unbiased, always >= 0).
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown kl estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


@torch.no_grad()
def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016 eq. 16), vectorised over the batch.

    rewards, values, mask (B, T) over response tokens, right-padded: mask marks the real tokens,
    contiguous from position 0. The episode ends after the last real token, so later values count as 0.
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t.
    Returns (advantages (B, T), returns (B, T)), 0 where masked, no gradient.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # multiplying by the mask restarts the recursion at the end of each episode
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def masked_whiten(values, mask, shift_mean=True, eps=1e-8):
    """Normalise values to zero mean, unit variance over the real positions. values, mask (B, T) -> (B, T).

    Uses the masked mean and the unbiased masked variance; with shift_mean=False the mean is added back
    (only the scale changes). Masked positions are set to 0.
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    count = mask.sum()
    # unbiased variance; a single real value has no spread, so clamp the divisor rather than divide by 0
    var = masked_sum((values - mean) ** 2, mask) / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def _groups(rewards, group_size):
    """rewards (B,) -> (B // group_size, group_size), checking the layout."""
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"batch of {rewards.shape[0]} rewards is not whole groups of {group_size}")
    return rewards.view(-1, group_size)


def grpo_advantages(rewards, group_size, scale=True):
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath sec. 4.1.2):
    (r - group mean) / (group std + 1e-6) with the unbiased std, or r - group mean if scale=False
    (Liu et al. 2025's Dr. GRPO).

    rewards (B,) laid out as consecutive groups of group_size samples of one prompt -> (B,).
    """
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        if group_size < 2:
            raise ValueError("scale=True needs group_size >= 2 to estimate a group std")
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-6)
    return centred.flatten()


def rloo_advantages(rewards, group_size):
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024 sec. 3):
    r_i - mean of the other group_size - 1 samples of the same prompt.
    rewards (B,) in consecutive groups -> (B,).
    """
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
    groups = _groups(rewards, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).flatten()


def logp_gap(engine_logps, trainer_logps, mask):
    """Largest |engine - trainer| log-prob over the masked tokens: the check that the rollout engine samples
    with the weights the trainer holds. engine_logps: per sample, the log-probs the engine reported for its
    sampled tokens (lists, ragged); trainer_logps, mask (N, R). 0.0 for an empty batch."""
    if not engine_logps:
        return 0.0
    grid = torch.zeros_like(trainer_logps, dtype=torch.float32)
    for row, values in enumerate(engine_logps):
        grid[row, :len(values)] = torch.as_tensor(values[:grid.shape[1]], dtype=torch.float32)
    return float(((grid - trainer_logps.float()).abs() * mask).max())


def old_logps_needed(ppo_epochs, minibatch_size, shard_sizes, kl_in_reward):
    """Whether PPO's old log-probs need a forward pass of their own before the update.

    Not when the update is one optimizer step over every sample (one epoch, each worker's shard in one
    minibatch): the policy that sampled is then the one the training forward runs, so its detached log-probs
    are the old ones (the ratio is exactly 1; the gradient is the same). A KL penalty in the reward needs
    them before the update, for the advantages, so it always does."""
    one_step = ppo_epochs == 1 and max(shard_sizes, default=0) <= minibatch_size
    return kl_in_reward or not one_step


class FixedKLController:
    """Constant KL coefficient, `value`; same interface as AdaptiveKLController."""

    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        pass

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019 sec. 2.2): steers the observed KL towards target.

    error = clip(current_kl / target - 1, -0.2, 0.2);  value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        # float(): a 0-dim tensor KL must not turn the coefficient into a tensor
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self):
        # target and horizon come from the config; only the coefficient evolves
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]
