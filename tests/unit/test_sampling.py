"""Inverse-CDF sampling draws from softmax(logits / T), honours top-p, and reports untruncated log-probs."""

import math

import pytest
import torch

from unipipe_ray.core.sampling import sample_tokens


def _frequencies(logits, draws, **kwargs):
    gen = torch.Generator().manual_seed(0)
    batch = logits.expand(draws, -1)
    tokens, _ = sample_tokens(batch, generator=gen, **kwargs)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def test_frequencies_match_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    for temperature in (1.0, 0.5, 2.0):
        freq = _frequencies(logits, 200_000, temperature=temperature)
        expected = torch.softmax(logits[0] / temperature, -1)
        # 200k draws: a frequency's standard error is <= 0.0012, so 0.006 is ~5 sigma.
        assert torch.allclose(freq, expected, atol=6e-3), (temperature, freq, expected)


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_renormalises():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    freq = _frequencies(probs.log()[None], 100_000, top_p=0.7)
    # 0.5 < 0.7 <= 0.5 + 0.3: tokens 0 and 1 stay, renormalised to 0.625 / 0.375.
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.625) < 0.01


def test_logps_are_the_untruncated_tempered_log_probs():
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(3))
    tokens, logps = sample_tokens(logits, temperature=0.7, top_p=0.5, generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logps, expected, atol=1e-6)


def test_same_seed_same_tokens_and_greedy_at_zero_temperature():
    logits = torch.randn(8, 50)
    a, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(5))
    b, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    greedy, lp = sample_tokens(logits, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(logits, -1).max(-1).values)


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]])
    freq = _frequencies(logits, 20_000)
    assert freq[1] == 0 and freq[3] == 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(torch.zeros(1, 3), top_p=0.0)
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_tokens(torch.zeros(3))
