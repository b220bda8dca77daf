"""Rollout samples as tensors: prompt + response rows, and per-response-token views of model outputs.

PPO's per-token quantities (log-probs, values, rewards, advantages) live on a (N, R) grid: row i, column j
is response token j of sample i (R = longest response, ``mask`` marks real tokens).

Rows are LEFT-padded so that every row ends at the last column: then the states that emit response tokens
all lie in the last R + 1 positions, and the LM head only runs there (``logits_to_keep``), not over the
prompt. Position ids come from the attention mask, so padding does not shift the positions the model sees.

Log-probs and entropies go through ``logps.token_logps_entropy`` (the shift of the right-padded training
batches' ``token_logps``, with the entropy from the same softmax): the kept positions get labels that mask
all but the response tokens, and ``on_response_grid`` moves the result from row positions onto the (N, R)
grid.
"""

from __future__ import annotations

import torch

from unipipe_ray.core.logps import IGNORE_INDEX, token_logps_entropy


def to_batch(samples, pad_id: int, device=None) -> dict:
    """Left-padded prompt+response rows: input_ids, attention_mask, position_ids (N, W); response_lens (N,);
    built on the CPU and moved to ``device`` once (the helpers below compute on the batch's device)."""
    rows = [s.prompt_ids + s.response_ids for s in samples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):], attention_mask[i, width - len(r):] = torch.tensor(r), 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
             "response_lens": torch.tensor([len(s.response_ids) for s in samples])}
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict, device=None) -> dict:
    """The keyword arguments a Hugging Face model takes from a batch."""
    return {k: batch[k].to(device) if device else batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def logits_to_keep(batch: dict) -> int:
    """How many trailing positions hold every response-emitting state (R + 1)."""
    return int(batch["response_lens"].max()) + 1


def response_mask(batch: dict) -> torch.Tensor:
    """(N, R) True on real response tokens (responses are right-aligned in the row, left-aligned here)."""
    lens = batch["response_lens"]
    return torch.arange(max(1, int(lens.max())), device=lens.device).unsqueeze(0) < lens.unsqueeze(1)


def _emitting_index(batch: dict, kept: int) -> torch.Tensor:
    """(N, R) index into the last ``kept`` positions of the state that emits response token j of row i."""
    lens = batch["response_lens"]
    r = max(1, int(lens.max()))
    j = torch.arange(r, device=lens.device).unsqueeze(0)
    # token j of row i sits at W - R_i + j, the state emitting it at W - 1 - R_i + j, which is index
    # K - 1 - R_i + j of the last K positions (>= 0 because K >= R + 1)
    index = kept - 1 - lens.unsqueeze(1) + j
    return index.masked_fill(~response_mask(batch), 0)


def gather_response(per_position: torch.Tensor, batch: dict) -> torch.Tensor:
    """(N, K) or (N, K, ...) outputs for the last K positions (K <= W) -> (N, R, ...) at the emitting states."""
    index = _emitting_index(batch, per_position.shape[1]).to(per_position.device)
    if per_position.dim() == 3:
        index = index.unsqueeze(-1).expand(-1, -1, per_position.shape[-1])
    return per_position.gather(1, index)


def response_labels(batch: dict, kept: int) -> torch.Tensor:
    """(N, kept) labels of the last ``kept`` positions, aligned with them as ``logps.token_logps`` wants:
    the response token ids, IGNORE_INDEX on the prompt and the padding."""
    width, lens = batch["input_ids"].shape[1], batch["response_lens"]
    is_response = torch.arange(kept, device=lens.device).unsqueeze(0) >= kept - lens.unsqueeze(1)
    return batch["input_ids"][:, width - kept:].masked_fill(~is_response, IGNORE_INDEX)


def on_response_grid(per_step: torch.Tensor, batch: dict) -> torch.Tensor:
    """(N, K-1) values of ``token_logps``' shifted layout (column c: the token at position c + 1 of the last K)
    -> (N, R) on the response grid, 0 where masked."""
    kept = per_step.shape[1] + 1
    index = _emitting_index(batch, kept).to(per_step.device)
    return per_step.gather(1, index).masked_fill(~response_mask(batch).to(per_step.device), 0.0)


def response_grid_logps(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Log-probs (N, R) of the response tokens from logits of the last K positions (N, K, V), at least fp32,
    0 where masked. The same computation as the training forward's (``response_grid_logps_entropy``), so
    that old, reference, engine-scored and new log-probs of the same weights agree to the bit: at ratio 1 a
    rounding difference would be all of a near-zero gradient, which Adam scales up to a full step."""
    return response_grid_logps_entropy(logits, batch)[0]


def response_grid_logps_entropy(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_grid_logps`` and the entropy (N, R) of the next-token distribution at each response
    position, from one pass over the logits (``logps.token_logps_entropy``: the entropy without gradient,
    the graph backpropagated once)."""
    logps, entropy, _ = token_logps_entropy(logits, response_labels(batch, logits.shape[1]).to(logits.device))
    return on_response_grid(logps, batch), on_response_grid(entropy, batch)
