"""SamS's reward (Huang et al. 2025, arXiv 2506.17252): what the scheduler's nets learn to predict for a kept
pair, a batch part (how much the last step lowered the batch's DPO likelihood) plus a sample part. Pure torch;
the scheduler (sams.py) and SFT-time pretraining (sams_pretrain.py) both label their rounds with it.
"""

import math

import torch


def batch_likelihood(margins):
    """M_t = mean_i l_i with l_i = -sigmoid(beta * h_i) (authors' code). margins = beta * h (n,) -> float."""
    return -torch.sigmoid(margins.detach().float()).mean().item()


def batch_reward(prev_likelihood, likelihood, past_mean=None, scale=50.0, shift=0.5):
    """Batch part of the reward: how much the step on round t-1's selection lowered M.

    r_B = (M_{t-1} - M_t) / max(|M_{t-1}|, |M_t|)  (0 if both are 0);
    smoothed s = 0.5 r_B + 0.5 * past_mean (the mean of earlier rounds' raw r_B; s = r_B in the first round);
    sigma_B = sigmoid(scale * s + shift)  (code: scale 50, shift 0.5).
    Returns (sigma_B, raw r_B); the caller adds raw r_B to its running mean.
    """
    denom = max(abs(prev_likelihood), abs(likelihood))
    raw = (prev_likelihood - likelihood) / denom if denom > 0 else 0.0
    smoothed = raw if past_mean is None else 0.5 * raw + 0.5 * past_mean
    return 1.0 / (1.0 + math.exp(-(scale * smoothed + shift))), raw


def min_max(x, eps=1e-8):
    """g(x) = (x - min) / (max - min) over the batch; a (near-)constant batch gets 0.5, neutral."""
    span = x.max() - x.min()
    return torch.full_like(x, 0.5) if span <= eps else (x - x.min()) / span


def sample_reward(margins, chosen_logps):
    """Sample part r_S = 0.5 g(beta h) + 0.5 (1 - g(logp_chosen)), g = min-max over the batch (code): favours a
    clear margin and a low chosen log-prob. margins, chosen_logps (n,) -> (n,) in [0, 1]."""
    margins, chosen_logps = margins.detach().float(), chosen_logps.detach().float()
    return 0.5 * min_max(margins) + 0.5 * (1 - min_max(chosen_logps))


def arm_labels(batch_reward_value, sample_rewards, gamma=0.5):
    """Scheduler labels r(a) = gamma * sigma_B + (1 - gamma) * r_S(a). sample_rewards (n,) -> (n,)."""
    return gamma * batch_reward_value + (1 - gamma) * sample_rewards
