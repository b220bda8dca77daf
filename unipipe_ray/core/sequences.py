"""Rollout samples as tensors: prompt + response rows, and per-response-token views of model outputs.

PPO's per-token quantities (log-probs, values, rewards, advantages) live on a (N, R) grid: row i, column j
is response token j of sample i (R = longest response, ``mask`` marks real tokens).

Rows are LEFT-padded so that every row ends at the last column: then the states that emit response tokens
all lie in the last R + 1 positions, and the LM head only runs there (``logits_to_keep``), not over the
prompt. Position ids come from the attention mask, so padding does not shift the positions the model sees.
"""

from __future__ import annotations

import torch


def to_batch(samples, pad_id: int) -> dict:
    """Left-padded prompt+response rows: input_ids, attention_mask, position_ids (N, W); response_lens (N,)."""
    rows = [s.prompt_ids + s.response_ids for s in samples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):], attention_mask[i, width - len(r):] = torch.tensor(r), 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "response_lens": torch.tensor([len(s.response_ids) for s in samples])}


def model_inputs(batch: dict, device=None) -> dict:
    """The keyword arguments a Hugging Face model takes from a batch."""
    return {k: batch[k].to(device) if device else batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def logits_to_keep(batch: dict) -> int:
    """How many trailing positions hold every response-emitting state (R + 1)."""
    return int(batch["response_lens"].max()) + 1


def response_mask(batch: dict) -> torch.Tensor:
    """(N, R) True on real response tokens (responses are right-aligned in the row, left-aligned here)."""
    lens = batch["response_lens"]
    return torch.arange(max(1, int(lens.max()))).unsqueeze(0) < lens.unsqueeze(1)


def _emitting_index(batch: dict, kept: int) -> torch.Tensor:
    """(N, R) index into the last ``kept`` positions of the state that emits response token j of row i."""
    lens = batch["response_lens"]
    r = max(1, int(lens.max()))
    j = torch.arange(r).unsqueeze(0)
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


def response_tokens(batch: dict) -> torch.Tensor:
    """(N, R) the response token ids (0 where masked)."""
    width, lens = batch["input_ids"].shape[1], batch["response_lens"]
    j = torch.arange(max(1, int(lens.max()))).unsqueeze(0)
    columns = (width - lens.unsqueeze(1) + j).clamp(max=width - 1)
    return batch["input_ids"].gather(1, columns).masked_fill(~response_mask(batch), 0)


def response_logps(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Log-probs (N, R) of the response tokens from logits of the last K positions (N, K, V), fp32, 0 where
    masked. Only the response positions are normalised, so no (N, K, V) fp32 copy is built."""
    mask = response_mask(batch).to(logits.device)
    rows = gather_response(logits, batch).float()
    tokens = response_tokens(batch).to(rows.device)
    logps = rows.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, dim=-1)
    return logps.masked_fill(~mask, 0.0)


def response_entropy(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Entropy (N, R) of the next-token distribution at each response position (fp32, 0 where masked)."""
    mask = response_mask(batch).to(logits.device)
    logp = torch.log_softmax(gather_response(logits, batch).float(), dim=-1)
    return (-(logp.exp() * logp).sum(-1)).masked_fill(~mask, 0.0)
