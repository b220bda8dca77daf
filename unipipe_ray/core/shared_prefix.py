"""One forward of each prompt for a group of samples that share it (GRPO's n answers to one prompt).

A batch of N rollouts from U prompts (N = U x samples_per_prompt) puts every prompt through the model n
times in the plain layout (``sequences.to_batch``). On arith with SmolLM2's chat template a prompt is about
65 tokens and an answer at most 64, so half the positions of a training forward are prompt copies. Here each
prompt but its last token runs once (``prefix``), its keys and values are indexed out to the samples (an
index, so the gradient of every copy flows back into the one forward), and the samples' suffixes (the last
prompt token, then the response) run on top. The suffix block is exactly the last R + 1 positions of the plain
layout, right-aligned the same way, so the logits come back in the layout ``sequences`` reads (the same
``response_grid_logps_entropy``), with the same position ids.

    shared_batch(samples, pad_id, device) -> dict | None   None when no prompt repeats (nothing to share)
    shared_prefix_logits(model, batch, prefix_model)        logits (N, R + 1, V) of the suffix positions
"""

from __future__ import annotations

import torch


def shared_batch(samples, pad_id: int, device=None) -> dict | None:
    """The prefix rows (U, Lp, left-padded), each sample's prefix row (``prefix_index``), and the suffix rows
    (N, R + 1, left-padded: ``input_ids``) with the attention mask over prefix + suffix (N, Lp + R + 1) and
    the suffix's position ids. None when every prompt is distinct or one has a single token."""
    prompts = [tuple(s.prompt_ids) for s in samples]
    rows = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    if len(rows) == len(prompts) or min(len(p) for p in rows) < 2:
        return None
    width = max(len(p) for p in rows) - 1
    prefix_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix_ids)
    for p, i in rows.items():
        prefix_ids[i, width - len(p) + 1:], prefix_mask[i, width - len(p) + 1:] = torch.tensor(p[:-1]), 1
    lens = torch.tensor([len(s.response_ids) for s in samples])
    kept = int(lens.max()) + 1
    input_ids = torch.full((len(samples), kept), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(samples):
        row = [s.prompt_ids[-1], *s.response_ids]
        input_ids[i, kept - len(row):], suffix_mask[i, kept - len(row):] = torch.tensor(row), 1
    index = torch.tensor([rows[p] for p in prompts])
    attention_mask = torch.cat([prefix_mask[index], suffix_mask], dim=1)
    batch = {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask,
             "prefix_position_ids": (prefix_mask.cumsum(1) - 1).clamp(min=0), "prefix_index": index,
             "input_ids": input_ids, "attention_mask": attention_mask,
             "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)[:, width:], "response_lens": lens}
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def shared_prefix_logits(model, batch: dict, prefix_model=None) -> torch.Tensor:
    """Logits (N, R + 1, V) of the suffix positions, as the plain forward's last R + 1 positions.

    ``model`` runs the suffix (the DDP / DeepSpeed wrapper in training, so its hooks see the forward whose
    output the loss uses); ``prefix_model`` (default ``model``) runs the prefix: the plain module under the
    wrapper, since autograd sums each parameter's gradient over both forwards before any hook fires."""
    prefix = (prefix_model or model)(input_ids=batch["prefix_ids"], attention_mask=batch["prefix_mask"],
                                      position_ids=batch["prefix_position_ids"], use_cache=True, logits_to_keep=1)
    cache = prefix.past_key_values
    cache.reorder_cache(batch["prefix_index"])  # a differentiable index_select: sample i gets its prompt's rows
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], past_key_values=cache, use_cache=True).logits
