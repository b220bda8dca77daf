"""The real pieces together: packaged SmolLM2 via the model loader, real GSM8K/HH records via the data
layer, and one DPO loss on a real batch (policy == reference, so the loss is exactly ln 2)."""

import math
import os
from pathlib import Path

import pytest
import torch

from unipipe_ray.core.logps import sequence_logps, token_logps
from unipipe_ray.core.losses import dpo_loss
from unipipe_ray.core.models import load_causal_lm, load_tokenizer
from unipipe_ray.data import collate_preference, get_task, tokenize_all

SHARED = Path(os.environ.get("UNIPIPE_SHARED_DATA", Path(__file__).parents[3] / "shared" / "data"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")]


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2-135m"), load_tokenizer("smollm2-135m")


def pair_logps(model, batch):
    """Sequence log-probs of a collated preference batch -> (chosen (B,), rejected (B,))."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    seq = sequence_logps(*token_logps(logits, batch["labels"]))
    return seq.chunk(2)


@pytest.mark.parametrize("task_name, path", [("hh_harmless", "hh-rlhf-harmless/test.jsonl.gz"),
                                             ("gsm8k", "gsm8k/test.jsonl")])
def test_dpo_loss_on_a_real_batch(smollm2, task_name, path):
    model, tok = smollm2
    pairs = get_task(task_name, path=SHARED / path).preference_pairs(seed=0)[:2]
    feats = tokenize_all(pairs, "preference", tok, max_length=192)
    assert len(feats) == 2
    batch = collate_preference(feats, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    chosen, rejected = pair_logps(model, batch)
    assert torch.isfinite(chosen).all() and (chosen < 0).all()
    losses, cr, rr = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(cr, torch.zeros_like(cr)) and torch.equal(rr, torch.zeros_like(rr))
