"""A reward model's scalar read at the last real token of each row, for training (stages/reward.py), PPO's
reward scorer (ppo/roles.py) and evaluation (eval/scoring.py).

The model is a Hugging Face sequence classifier with one output (``AutoModelForSequenceClassification``
loads the checkpoint). We pool the final hidden state at the last attention-mask position ourselves: with
pad == eos (SmolLM2), Hugging Face's own pooling would skip the closing EOS token.
"""

from __future__ import annotations

import torch

from unipipe_ray.core import packing as packing_lib


def score_head(module):
    """The linear reward head of a (possibly PEFT-wrapped) sequence classifier."""
    return module.score


def rewards(model, module, batch: dict, packing: bool | str = False) -> torch.Tensor:
    """Scalar rewards (N,) of a padded batch (N, T): the head applied at each row's last real token.

    ``model`` is what runs the forward (the DDP/DeepSpeed wrapper while training), ``module`` the plain model.
    packing (right-padded batches only; True, or "auto" where it drops enough padding): the forward runs on the
    sequences packed without padding (``core.packing``) and the head reads each sequence's last token there.
    """
    layout = packing_lib.chosen_layout(batch["attention_mask"], module, packing)
    if layout is not None:
        return _packed_rewards(model, module, batch, layout)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    # The last 1 of the attention mask: the last real token under right or left padding.
    width = batch["attention_mask"].shape[1]
    last = width - 1 - batch["attention_mask"].flip(1).argmax(dim=1)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return score_head(module)(pooled).squeeze(-1).float()


def _packed_rewards(model, module, batch: dict, layout) -> torch.Tensor:
    packed = packing_lib.pack({"input_ids": batch["input_ids"]}, layout)
    # no attention mask and no KV cache: HF keeps attention inside each sequence (see core.packing)
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                output_hidden_states=True)
    hidden = out.hidden_states[-1].flatten(0, 1)
    pooled = hidden[packing_lib.last_token_indices(layout).to(hidden.device)]
    return score_head(module)(pooled).squeeze(-1).float()


def pair_rewards(model, module, batch: dict, packing: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) rewards of a (2B, T) preference batch."""
    return rewards(model, module, batch, packing).chunk(2)
