"""SamS pretraining during SFT (Huang et al. 2025, arXiv 2506.17252: the encoder is pretrained with rewards built
from the SFT loss, then frozen for DPO). The paper gives no formula; this one mirrors the DPO reward:

    r(x) = gamma * sigma_B + (1 - gamma) * g(loss(x))
    sigma_B: `sams.batch_reward` with M = the batch's mean SFT loss (lower is better, like DPO's M_t);
    g: min-max over the batch of the per-example token-mean SFT loss: favours examples the policy still
       finds unlikely, as DPO's sample reward favours a low chosen log-prob.

It is lagged by one round like DPO's, so it needs no extra forward after the step. Each round trains the
connector, a learned encoder (not a frozen MiniLM) and f_S one Adam step (`SamsScheduler.pretrain_step`).
The state rides in the SFT checkpoint's trainer_state.pt (extra["sams_pretrain"]); a DPO stage whose input
model is that checkpoint starts its scheduler's nets from it (`pretrained_nets`).

Imports only torch and the standard library.
"""

from pathlib import Path

import torch

from unipipe_ray.core.logps import sequence_logps
from unipipe_ray.core.sams_nets import arm_forward
from unipipe_ray.core.sams_rewards import arm_labels, batch_reward, min_max

STATE_KEY = "sams_pretrain"


def sft_rewards(prev_losses, loss_mean, past_mean=None, gamma=0.5):
    """Labels of round t-1's examples. prev_losses (n,) their token-mean SFT losses; loss_mean = M_t, the mean
    loss of round t's batch after the step. Returns (labels (n,), raw r_B)."""
    prev_losses = prev_losses.detach().float()
    reward_b, raw = batch_reward(prev_losses.mean().item(), loss_mean, past_mean)
    return arm_labels(reward_b, min_max(prev_losses), gamma), raw


def sft_arm_inputs(module, batch, chunk_size=None):
    """One no-grad forward of an SFT micro-batch: arm features (n, L, d) over real tokens, and each example's
    token-mean response NLL (n,)."""
    features, logps, mask = arm_forward(module, batch, chunk_size)
    return features.float().cpu(), -sequence_logps(logps, mask, average=True).float().cpu()


class SftPretrainer:
    """Drives `scheduler.pretrain_step` from SFT batches: step(features (n, L, d), losses (n,)) once per
    micro-batch, before the policy's step on it (its features come from theta_{t-1}, as in DPO)."""

    def __init__(self, scheduler):
        self.sched, self.pending = scheduler, None
        self.past_reward_sum, self.past_reward_count = 0.0, 0

    def step(self, features, losses):
        """Finish round t-1's labels with this batch's mean loss, pretrain on them, hold round t."""
        metrics = {}
        if self.pending is not None:
            past_mean = self.past_reward_sum / self.past_reward_count if self.past_reward_count else None
            labels, raw = sft_rewards(self.pending["losses"], losses.float().mean().item(), past_mean,
                                      self.sched.settings.gamma)
            self.past_reward_sum, self.past_reward_count = self.past_reward_sum + raw, self.past_reward_count + 1
            metrics = {"sams/pretrain_mse": self.sched.pretrain_step(self.pending["features"], labels),
                       "sams/pretrain_label_mean": labels.mean().item()}
        self.pending = {"features": features.detach().float().cpu(), "losses": losses.detach().float().cpu()}
        return metrics

    def state_dict(self):
        return {"scheduler": self.sched.state_dict(), "pending": self.pending,
                "past_reward_sum": self.past_reward_sum, "past_reward_count": self.past_reward_count}

    def load_state_dict(self, state):
        self.sched.load_state_dict(state["scheduler"])
        self.pending = state["pending"]
        self.past_reward_sum, self.past_reward_count = state["past_reward_sum"], state["past_reward_count"]


def pretrained_nets(model_path):
    """The pretrained scheduler nets saved with an SFT checkpoint (None if it has none)."""
    state_file = Path(model_path) / "trainer_state.pt"
    if not state_file.is_file():
        return None
    extra = torch.load(state_file, weights_only=True).get("extra", {})
    return extra[STATE_KEY]["scheduler"]["nets"] if STATE_KEY in extra else None
