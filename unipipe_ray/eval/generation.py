"""Greedy answers from a checkpoint, scored by a task's gold checker (the demo's before/after accuracy)."""

from __future__ import annotations

import torch
from tqdm import tqdm


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 128, batch_size: int = 16,
             max_prompt_length: int = 256, progress: bool = True) -> list[str]:
    """Greedy completions of chat prompts (tuples of messages), left-padded batches with a KV cache."""
    from unipipe_ray.data import collate_prompts, tokenize_prompt

    model.eval()
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        feats = [tokenize_prompt(p, tokenizer, max_prompt_length) for p in prompts[i:i + batch_size]]
        batch = collate_prompts(feats, tokenizer.pad_token_id)
        device = next(model.parameters()).device
        ids = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = ids[:, batch["input_ids"].shape[1]:]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def answer_accuracy(model_spec: str, task, examples: list, max_new_tokens: int = 128,
                    threads: int | None = None) -> dict:
    """Share of ``examples`` (anything with .prompt and .meta) whose greedy answer the task's checker accepts."""
    from unipipe_ray.core.models import load_causal_lm, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    from unipipe_ray.runtime.devices import actor_device

    tokenizer = load_tokenizer(model_spec)
    model = load_causal_lm(model_spec).to(actor_device())
    completions = generate(model, tokenizer, examples, max_new_tokens=max_new_tokens)
    scores = [task.gold_reward(ex, c) for ex, c in zip(examples, completions, strict=True)]
    return {"accuracy": sum(scores) / max(1, len(scores)), "n": len(scores),
            "example": completions[0] if completions else ""}
