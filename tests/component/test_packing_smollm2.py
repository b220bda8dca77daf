"""Padding-free packing on the real SmolLM2-135M (Llama architecture, its own config: GQA, RoPE theta, tied
head): the packed forward gives the padded forward's per-token log-probs, under sdpa and eager attention,
on sequences whose lengths differ tenfold (unit tests do the same, gradients included, on the tiny model)."""

import pytest
import torch

from unipipe_ray.core.forward import token_logps_of
from unipipe_ray.core.logps import IGNORE_INDEX
from unipipe_ray.core.models import load_causal_lm, load_tokenizer
from unipipe_ray.data import collate_sft


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_log_probs_equal_padded_on_smollm2(attention):
    tok = load_tokenizer("smollm2-135m")
    texts = ["Hi.", "The quick brown fox jumps over the lazy dog. " * 6,
             "Two plus two is four, and four plus four is eight."]
    feats = []
    for text in texts:
        ids = tok(text)["input_ids"]
        feats.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    batch = collate_sft(feats, tok.pad_token_id)
    model = load_causal_lm("smollm2-135m").eval()
    model.set_attn_implementation(attention)
    with torch.no_grad():
        padded, mask = token_logps_of(model, model, batch, chunk_size=64)
        packed, packed_mask = token_logps_of(model, model, batch, chunk_size=64, packing=True)
    assert torch.equal(mask, packed_mask) and mask.sum() > 60
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-4)
