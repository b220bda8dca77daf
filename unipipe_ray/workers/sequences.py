"""Rollout samples as tensors: prompt + response rows, and per-response-token views of model outputs.

PPO's per-token quantities (log-probs, values, rewards, advantages) live on a (N, R) grid: row i, column j
is response token j of sample i (R = longest response, ``mask`` marks real tokens). Position
``prompt_len + j - 1`` of the model's outputs is the state that emits response token j.
"""

from __future__ import annotations

import torch


def to_batch(samples, pad_id: int) -> dict:
    """Right-padded prompt+response rows: input_ids, attention_mask (N, T); prompt_lens, response_lens (N,)."""
    rows = [s.prompt_ids + s.response_ids for s in samples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)], attention_mask[i, :len(r)] = torch.tensor(r), 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "prompt_lens": torch.tensor([len(s.prompt_ids) for s in samples]),
            "response_lens": torch.tensor([len(s.response_ids) for s in samples])}


def response_index(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (N, R) of the states that emit each response token, mask (N, R) of real tokens)."""
    lens = batch["response_lens"]
    r = max(1, int(lens.max()))
    j = torch.arange(r).unsqueeze(0)
    mask = j < lens.unsqueeze(1)
    positions = (batch["prompt_lens"].unsqueeze(1) - 1 + j).clamp(max=batch["input_ids"].shape[1] - 2)
    return positions.masked_fill(~mask, 0), mask


def gather_response(per_position: torch.Tensor, batch: dict) -> torch.Tensor:
    """(N, T) or (N, T, ...) per-position outputs -> (N, R, ...) at the response-emitting states."""
    positions, mask = response_index(batch)
    index = positions.to(per_position.device)
    if per_position.dim() == 3:
        index = index.unsqueeze(-1).expand(-1, -1, per_position.shape[-1])
    return per_position.gather(1, index)


def response_tokens(batch: dict) -> torch.Tensor:
    """(N, R) the response token ids (0 where masked)."""
    positions, mask = response_index(batch)
    return batch["input_ids"].gather(1, (positions + 1).masked_fill(~mask, 0)).masked_fill(~mask, 0)


def response_logps(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Log-probs (N, R) of the response tokens from logits (N, T, V), in fp32; 0 where masked.

    Only the response positions are normalised, so no (N, T, V) fp32 copy is built.
    """
    _, mask = response_index(batch)
    rows = gather_response(logits, batch).float()
    tokens = response_tokens(batch).to(rows.device)
    logps = rows.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, dim=-1)
    return logps.masked_fill(~mask.to(rows.device), 0.0)


def response_entropy(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Entropy (N, R) of the next-token distribution at each response position (fp32, 0 where masked)."""
    _, mask = response_index(batch)
    logp = torch.log_softmax(gather_response(logits, batch).float(), dim=-1)
    return (-(logp.exp() * logp).sum(-1)).masked_fill(~mask.to(logp.device), 0.0)
