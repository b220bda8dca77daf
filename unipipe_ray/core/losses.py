"""Losses for SFT, reward modelling, DPO-family preference tuning and PPO.

Every loss is a pure function of tensors that returns per-example (or per-token) values; reduction
happens only in `reduce_loss`, which also carries the data-parallel normalisation contract.

Imports only torch: the math modules never pull in ray, deepspeed, vllm or transformers.
"""

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def masked_sum(values, mask, dim=None):
    """Sum of values where mask is true. values, mask (B, T) -> scalar, or reduced over dim."""
    # where() rather than values * mask: a masked inf or nan must not leak into the sum
    masked = torch.where(mask.bool(), values, 0.0)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values, mask, dim=None):
    """Mean of values where mask is true. values, mask (B, T) -> scalar, or reduced over dim.

    An all-masked row (or tensor) gives 0 rather than nan.
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def reduce_loss(per_token, mask=None, mode="token", normalizer=None):
    """The one place a loss becomes the scalar a backward pass starts from (every stage's and PPO's).

    mode "token": per-token losses (B, T), sum over real tokens / normalizer (default: this shard's
    real-token count).
    mode "sequence": per-token losses (B, T), sum over sequences of each sequence's token mean / normalizer
    (default: B).
    mode "example": one loss per example (B,) (a preference pair's, a sequence's), their sum / normalizer
    (default: B); no mask.
    Data-parallel contract: if each of W shards passes normalizer = global_count / W (tokens, sequences or
    examples), the mean of the W reduced losses (what DDP's gradient averaging computes) equals the
    reduction over the global batch.
    """
    if mode == "example":
        return per_token.sum() / (per_token.shape[0] if normalizer is None else normalizer)
    if mode == "token":
        total = masked_sum(per_token, mask)
        default = mask.sum().clamp(min=1)
    elif mode == "sequence":
        total = masked_mean(per_token, mask, dim=-1).sum()
        default = per_token.shape[0]
    else:
        raise ValueError(f"unknown reduction mode {mode!r}; expected 'token', 'sequence' or 'example'")
    return total / (default if normalizer is None else normalizer)


def sft_loss(logps, mask, mode="token", normalizer=None):
    """Negative log-likelihood of the target tokens. logps, mask (B, T) -> scalar (see reduce_loss)."""
    return reduce_loss(-logps, mask, mode=mode, normalizer=normalizer)


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None):
    """Pairwise reward-model loss, -log sigmoid(r_c - r_r - margin) (Bradley & Terry 1952;
    Ouyang et al. 2022 eq. 1; the optional margin is Llama 2's, Touvron et al. 2023 eq. 2).

    chosen_rewards, rejected_rewards (B,), margin (B,) or None -> (losses (B,), accuracies (B,)).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    accuracies = (chosen_rewards > rejected_rewards).float()
    return -F.logsigmoid(diff), accuracies


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta,
    loss_type="sigmoid",
    label_smoothing=0.0,
):
    """DPO-family losses from sequence log-probs, all (B,).

    h = (pc - rc) - (pr - rr), the implicit reward margin divided by beta.
    "sigmoid": -log sigmoid(beta h) (Rafailov et al. 2023 eq. 7); with label_smoothing eps it is
    cDPO (Mitchell 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    "ipo": (h - 1 / (2 beta))^2 (Azar et al. 2023 eq. 17).
    Returns (losses, chosen_rewards, rejected_rewards), rewards = beta (policy - ref), detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        # cDPO's smoothing is defined for the sigmoid loss only; ignoring it silently would mislead
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, beta, gamma):
    """SimPO (Meng et al. 2024 eq. 6): -log sigmoid(beta (c - r) - gamma), reference-free.

    policy_chosen_logps, policy_rejected_logps (B,) must already be length-normalised (mean over
    real tokens, `sequence_logps(..., average=True)`); gamma is the target reward margin.
    Returns (losses, chosen_rewards = beta c, rejected_rewards = beta r), all (B,), rewards detached.
    """
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ppo_policy_loss(logps, old_logps, advantages, clip_eps):
    """PPO clipped surrogate (Schulman et al. 2017 eq. 7), negated to be minimised, per token.

    logps (B, T) under the current policy, old_logps (B, T) under the rollout policy, advantages (B, T).
    losses = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logps - old_logps).
    Returns (losses (B, T), clipped (B, T) float: 1 where the clipped branch was taken, which then
    carries no gradient; its masked mean is the clip fraction).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_loss(values, old_values, returns, clip_eps):
    """Clipped value loss of PPO implementations (Schulman et al. 2017's baselines code), per token.

    values, old_values, returns (B, T) -> losses (B, T) =
    0.5 max((v - R)^2, (old_v + clip(v - old_v, -eps, eps) - R)^2).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
