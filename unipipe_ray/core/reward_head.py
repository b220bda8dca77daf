"""A reward model's scalar read at the last real token of each row, for training (stages/reward.py), PPO's
reward scorer (ppo/roles.py) and evaluation (eval/scoring.py).

The model is a Hugging Face sequence classifier with one output (``AutoModelForSequenceClassification``
loads the checkpoint). We pool the final hidden state at the last attention-mask position ourselves: with
pad == eos (SmolLM2), Hugging Face's own pooling would skip the closing EOS token.
"""

from __future__ import annotations

import torch


def score_head(module):
    """The linear reward head of a (possibly PEFT-wrapped) sequence classifier."""
    return module.score


def rewards(model, module, batch: dict) -> torch.Tensor:
    """Scalar rewards (N,) of a padded batch (N, T): the head applied at each row's last real token.

    ``model`` is what runs the forward (the DDP/DeepSpeed wrapper while training), ``module`` the plain model.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    # The last 1 of the attention mask: the last real token under right or left padding.
    width = batch["attention_mask"].shape[1]
    last = width - 1 - batch["attention_mask"].flip(1).argmax(dim=1)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return score_head(module)(pooled).squeeze(-1).float()


def pair_rewards(model, module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) rewards of a (2B, T) preference batch."""
    return rewards(model, module, batch).chunk(2)
