"""Pad tokenized features into batches of tensors.

Training batches are right-padded (labels padded with -100, so padding never counts in a loss);
generation prompts are left-padded so every row's next token is at the same last position.
"""
from __future__ import annotations

import torch

from unipipe_ray.data.tokenize import IGNORE_INDEX


def collate_sft(features: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """features with input_ids, labels -> input_ids, attention_mask, labels: (B, T) long, right-padded."""
    ids = [f["input_ids"] for f in features]
    length = _length(ids, pad_token_id, pad_to_multiple_of)
    return {"input_ids": _pad(ids, pad_token_id, length),
            "attention_mask": _pad([[1] * len(row) for row in ids], 0, length),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length)}


def collate_preference(features: list[dict], pad_token_id: int,
                       pad_to_multiple_of: int | None = None) -> dict:
    """B pairs -> one batch of 2B rows: rows [0, B) chosen, rows [B, 2B) rejected; keys as collate_sft.

    One forward pass then scores both sides; split with `logps[:B], logps[B:]`.
    """
    rows = [{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
            for side in ("chosen", "rejected") for f in features]
    return collate_sft(rows, pad_token_id, pad_to_multiple_of)


def select_pairs(batch: dict, kept: list[int]) -> dict:
    """The pairs ``kept`` (indices into its B pairs) of a collated (2B, T) preference batch, as
    ``collate_preference`` of those pairs alone would give them: chosen rows then rejected rows, padded to
    the longest kept row. Cutting the collated batch (on whatever device it is) spares collating twice."""
    n = batch["input_ids"].shape[0] // 2
    rows = torch.tensor(list(kept) + [n + j for j in kept], device=batch["input_ids"].device)
    width = int(batch["attention_mask"][rows].sum(1).max())
    return {k: v[rows, :width].contiguous() for k, v in batch.items()}


def collate_prompts(features: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """features with input_ids -> input_ids, attention_mask: (B, T) long, left-padded for generation."""
    ids = [f["input_ids"] for f in features]
    length = _length(ids, pad_token_id, pad_to_multiple_of)
    return {"input_ids": _pad(ids, pad_token_id, length, left=True),
            "attention_mask": _pad([[1] * len(row) for row in ids], 0, length, left=True)}


def _length(rows: list[list[int]], pad_token_id: int, multiple: int | None) -> int:
    if not rows:
        raise ValueError("cannot collate an empty list of features")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; give the tokenizer a pad token (e.g. its eos) first")
    length = max(map(len, rows))
    if multiple:
        length = -(-length // multiple) * multiple
    return length


def _pad(rows: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(length - len(row), length) if left else slice(0, len(row))
            out[i, span] = torch.tensor(row, dtype=torch.long)
    return out
