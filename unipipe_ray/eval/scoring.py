"""Model scores of (prompt, response) pairs: reward-model scores, sequence log-probs, DPO implicit rewards.

Every function takes parallel lists ``prompts`` (chat messages, as in data.records) and ``responses``
(strings) and returns a float64 array (N,). Each pair is tokenized like an SFT example (chat template,
EOS appended once, truncation from the start of the prompt), so a reward model sees the text the RM stage
trained on. Rows are batched by length (less padding: most of the cost on a CPU) and put back in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from unipipe_ray.data import SFTExample, collate_sft, tokenize_sft


def load_reward_model(path: str, dtype: torch.dtype = torch.float32, device=None):
    """(model, tokenizer) of a reward-model checkpoint (the `rm` stage's: a sequence classifier with one
    output), on ``device`` (default: runtime.devices.actor_device). A causal-LM checkpoint loads too, with a
    fresh random head (useful only in tests)."""
    from transformers import AutoModelForSequenceClassification

    from unipipe_ray.core.models import load_tokenizer, resolve_model
    from unipipe_ray.runtime.devices import resolve

    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(path), num_labels=1, dtype=dtype,
                                                               use_safetensors=True)
    model.to(resolve(device))
    tokenizer = load_tokenizer(path)
    # HF's classifier forward refuses batches > 1 without a pad id (we pool ourselves, but it still checks).
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_policy(path: str, dtype: torch.dtype = torch.float32, device=None):
    """(causal LM in eval mode, tokenizer) for a model spec or checkpoint directory, on ``device`` (default:
    runtime.devices.actor_device)."""
    from unipipe_ray.core.models import load_causal_lm, load_tokenizer
    from unipipe_ray.runtime.devices import resolve

    model = load_causal_lm(path, dtype=dtype).to(resolve(device))
    return model.eval(), load_tokenizer(path)


def _features(prompts: Sequence, responses: Sequence[str], tokenizer, max_length: int) -> list[dict]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [tokenize_sft(SFTExample(tuple(p), r, f"example {i}"), tokenizer, max_length)
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]


@torch.no_grad()
def _batched(score: Callable[[dict], torch.Tensor], features: list[dict], pad_id: int, batch_size: int,
             desc: str, progress: bool, model) -> np.ndarray:
    """score(batch) -> (B,) over length-sorted batches on ``model``'s device; results in the original order."""
    device = next(model.parameters()).device
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    out = np.zeros(len(features), dtype=np.float64)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_sft([features[i] for i in idx], pad_id).items()}
        out[idx] = score(batch).double().cpu().numpy()
    return out


def reward_scores(model, tokenizer, prompts: Sequence, responses: Sequence[str], max_length: int = 512,
                  batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """(N,) reward-model scores: the head at each sequence's last real token (core.reward_head.rewards)."""
    from unipipe_ray.core.reward_head import rewards

    feats = _features(prompts, responses, tokenizer, max_length)
    return _batched(lambda b: rewards(model, model, b), feats, tokenizer.pad_token_id, batch_size,
                    "reward scores", progress, model)


def text_response_logps(model, tokenizer, prompts: Sequence, responses: Sequence[str], max_length: int = 512,
                   batch_size: int = 8, chunk_size: int | None = 1024, progress: bool = True) -> np.ndarray:
    """(N,) sum of log p(response token | prompt, earlier tokens), EOS included, prompt excluded.
    ``chunk_size`` scores through core.forward's chunked LM head (no (B, T, V) logits); None: full logits."""
    from unipipe_ray.core.forward import token_logps_of
    from unipipe_ray.core.logps import sequence_logps

    feats = _features(prompts, responses, tokenizer, max_length)
    return _batched(lambda b: sequence_logps(*token_logps_of(model, model, b, chunk_size)), feats,
                    tokenizer.pad_token_id, batch_size, "log-probs", progress, model)


def implicit_rewards(policy, ref, tokenizer, prompts: Sequence, responses: Sequence[str], beta: float,
                     max_length: int = 512, batch_size: int = 8, progress: bool = True) -> np.ndarray:
    """(N,) DPO implicit rewards beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, eq. 5; the
    log Z(x) term is the same for both responses of a prompt, so it cancels in every comparison)."""
    pol = text_response_logps(policy, tokenizer, prompts, responses, max_length, batch_size, progress=progress)
    ref_lp = text_response_logps(ref, tokenizer, prompts, responses, max_length, batch_size, progress=progress)
    return beta * (pol - ref_lp)
