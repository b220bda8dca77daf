"""core.forward: the chunked LM-head path equals the full-logits path (values and gradients, tied and untied
embeddings) on the tiny Llama, and the output embedding is always put back."""

import pytest
import torch

from unipipe_ray.core.forward import sequence_pair_logps, token_logps_of
from unipipe_ray.core.logps import sequence_logps, token_logps
from unipipe_ray.core.models import load_causal_lm, load_tokenizer, tiny_model_dir
from unipipe_ray.data import collate_preference, get_task, tokenize_all


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer("tiny")
    feats = tokenize_all(get_task("arith", n=3, seed=0).preference_pairs(), "preference", tok, max_length=96)
    return collate_preference(feats, tok.pad_token_id)  # (6, T), right-padded, prompt masked


def _model(tied: bool):
    spec = "tiny" if tied else str(tiny_model_dir(tie_word_embeddings=False))
    # float64: the two paths then agree to rounding, so a tight tolerance catches a real difference
    model = load_causal_lm(spec).double().train()
    assert model.config.tie_word_embeddings == tied
    return model


def _grads(model, batch, chunk_size):
    model.zero_grad(set_to_none=True)
    chosen, rejected = sequence_pair_logps(model, model, batch, chunk_size=chunk_size)
    # unequal weights per pair, so a mix-up between rows or sides would show in the gradient
    (torch.arange(1.0, 4.0, dtype=chosen.dtype) @ (chosen - 0.5 * rejected)).backward()
    return (chosen.detach(), rejected.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_equals_full_logps_and_gradients(batch, tied):
    model = _model(tied)
    full_logps, full_grads = _grads(model, batch, chunk_size=None)
    chunk_logps, chunk_grads = _grads(model, batch, chunk_size=7)  # 7: chunks that do not divide the rows
    for full, chunked in zip(full_logps, chunk_logps):
        assert full.shape == (3,) and torch.all(full < 0)
        torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)
    assert full_grads.keys() == chunk_grads.keys()
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0, name  # every parameter, the LM head included, gets a gradient
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-8, atol=1e-10, msg=name)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_full_path_is_the_plain_hf_forward_and_token_shapes_match(batch):
    model = load_causal_lm("tiny").eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        today = sequence_logps(*token_logps(logits, batch["labels"])).chunk(2)
        full = sequence_pair_logps(model, model, batch)
        chunked = sequence_pair_logps(model, model, batch, chunk_size=16)
        (logps, mask), (clogps, cmask) = (token_logps_of(model, model, batch, c) for c in (None, 16))
    for a, b, c in zip(today, full, chunked):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-4)  # fp32: summation order differs
    assert logps.shape == clogps.shape == (6, batch["input_ids"].shape[1] - 1)
    assert torch.equal(mask, cmask) and torch.all(clogps[~cmask] == 0)


def test_the_wrapper_runs_and_the_head_is_restored(batch):
    module = load_causal_lm("tiny")
    head, calls = module.get_output_embeddings(), []

    def wrapper(**kwargs):  # stands in for DDP / DeepSpeed: it must be called, with the head swapped out
        calls.append(type(module.get_output_embeddings()).__name__)
        return module(**kwargs)

    with torch.no_grad():
        sequence_pair_logps(wrapper, module, batch, chunk_size=32)
    assert calls == ["Identity"] and module.get_output_embeddings() is head

    def failing(**kwargs):
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        token_logps_of(failing, module, batch, chunk_size=32)
    assert module.get_output_embeddings() is head
    assert module.lm_head.weight is module.model.embed_tokens.weight  # still tied


def test_models_the_chunked_path_cannot_serve_are_refused(batch):
    module = load_causal_lm("tiny")
    module.lm_head = torch.nn.Linear(64, module.config.vocab_size, bias=True)
    with pytest.raises(ValueError, match="bias-free"):
        token_logps_of(module, module, batch, chunk_size=32)
    assert isinstance(module.lm_head, torch.nn.Linear)
