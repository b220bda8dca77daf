import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from unipipe_ray.core.logps import (
    IGNORE_INDEX,
    chunked_token_logps,
    sequence_logps,
    token_entropy,
    token_logps,
    token_logps_entropy,
)


def test_token_logps_hand_value():
    """labels [-100, 1, 0, -100]: positions 0..2 predict labels 1..3.
    pos 0 logits [0, 0], target 1 -> -ln 2 = -0.6931; pos 1 logits [ln 3, 0], target 0 -> ln 3/4 = -0.2877;
    pos 2 predicts -100 -> masked, 0."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0], [1.0, 2.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
    logps, mask = token_logps(logits, labels)
    assert logps.dtype == torch.float32 and logps.shape == (1, 3)
    assert mask.tolist() == [[True, True, False]]
    torch.testing.assert_close(logps, torch.tensor([[-math.log(2), math.log(0.75), 0.0]]))


def test_token_logps_matches_log_softmax_bf16():
    """bf16 logits are upcast: same as fp32 log_softmax of the upcast logits, then gather."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7).bfloat16()
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    logps, mask = token_logps(logits, labels)
    expected = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])
    torch.testing.assert_close(logps, expected.squeeze(-1) * mask)
    assert logps.dtype == torch.float32


def test_sequence_logps_hand_value():
    """logps [[-1, -2, 9], [-3, 0, 0]] with masks [[1, 1, 0], [1, 0, 0]]: sums -3, -3; means -1.5, -3.
    The masked 9 must not leak in."""
    logps = torch.tensor([[-1.0, -2.0, 9.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(sequence_logps(logps, mask), torch.tensor([-3.0, -3.0]))
    torch.testing.assert_close(sequence_logps(logps, mask, average=True), torch.tensor([-1.5, -3.0]))


def test_token_entropy_hand_value():
    """pos 0 uniform over 4 -> ln 4 = 1.3863; pos 1 p = (3/4, 1/4, 0, 0) ->
    -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623; pos 2 masked -> 0; the last position predicts nothing."""
    neg = -1e4
    logits = torch.tensor([[[0.0] * 4, [math.log(3), 0.0, neg, neg], [1.0, 2.0, 3.0, 4.0], [0.0] * 4]])
    mask = torch.tensor([[True, True, False]])
    expected = torch.tensor([[math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), 0.0]])
    torch.testing.assert_close(token_entropy(logits, mask), expected)


def _random_case(dtype, B=3, T=9, H=6, V=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, : T // 2] = IGNORE_INDEX  # prompt tokens
    labels[-1, T - 3 :] = IGNORE_INDEX  # right padding
    upstream = torch.randn(B, T - 1, generator=gen, dtype=torch.float64)
    return hidden, weight, labels, upstream


def _values_and_grads(fn, hidden, weight, labels, upstream):
    logps, mask = fn(hidden, weight, labels)
    grads = torch.autograd.grad((logps * upstream.to(logps.dtype)).sum(), (hidden, weight))
    return logps, mask, grads


def _full(hidden, weight, labels):
    return token_logps(hidden @ weight.T, labels)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 1024])
def test_chunked_matches_full_float64(chunk_size):
    """18 real target positions (5 + 8 + 5): chunk sizes 5 and 7 leave a ragged last chunk.
    Values and grads match the full-logits path exactly (float64 stays float64)."""
    hidden, weight, labels, upstream = _random_case(torch.float64)
    chunked = partial(chunked_token_logps, chunk_size=chunk_size)
    logps, mask, grads = _values_and_grads(chunked, hidden, weight, labels, upstream)
    ref_logps, ref_mask, ref_grads = _values_and_grads(_full, hidden, weight, labels, upstream)
    assert torch.equal(mask, ref_mask) and int(mask.sum()) == 18
    assert logps.dtype == torch.float64
    torch.testing.assert_close(logps, ref_logps, rtol=1e-12, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_chunked_gradcheck_float64():
    """The hand-written backward agrees with finite differences (chunk size 3 over 5 real targets)."""
    hidden, weight, labels, _ = _random_case(torch.float64, B=2, T=4, H=3, V=5)
    labels[0, 1] = IGNORE_INDEX

    def fn(h, w):
        return chunked_token_logps(h, w, labels, chunk_size=3)[0]

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_chunked_matches_full_float32():
    hidden, weight, labels, upstream = _random_case(torch.float32, B=4, T=33, H=16, V=50, seed=1)
    chunked = partial(chunked_token_logps, chunk_size=10)
    logps, _, grads = _values_and_grads(chunked, hidden, weight, labels, upstream)
    ref_logps, _, ref_grads = _values_and_grads(_full, hidden, weight, labels, upstream)
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_chunked_bf16_inputs_give_fp32_logps():
    """bf16 hidden/weight: logps are fp32 and equal the full path (same bf16 matmul, then upcast);
    grads come back in bf16 and agree with the full path to bf16 precision."""
    hidden, weight, labels, upstream = _random_case(torch.bfloat16, seed=2)
    chunked = partial(chunked_token_logps, chunk_size=4)
    logps, _, grads = _values_and_grads(chunked, hidden, weight, labels, upstream)
    ref_logps, _, ref_grads = _values_and_grads(_full, hidden, weight, labels, upstream)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=2e-2)


def test_chunked_frozen_head_and_all_masked():
    """A frozen LM head gets no gradient; a batch with no real targets gives zeros and zero grads."""
    hidden, weight, labels, _ = _random_case(torch.float64)
    logps, _ = chunked_token_logps(hidden, weight.detach(), labels, chunk_size=4)
    (grad_hidden,) = torch.autograd.grad(logps.sum(), (hidden,))
    assert grad_hidden.abs().sum() > 0
    labels[:] = IGNORE_INDEX
    logps, mask = chunked_token_logps(hidden, weight, labels)
    assert not mask.any() and torch.equal(logps, torch.zeros_like(logps))
    grad_hidden, grad_weight = torch.autograd.grad(logps.sum(), (hidden, weight))
    assert grad_hidden.abs().sum() == 0 and grad_weight.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_logps_and_entropy_equal_the_separate_ones(dtype):
    """Values, and the gradient of a weighted sum of the log-probs, as token_logps' and token_entropy's (a
    large logit scale, some labels masked, one row all masked); bf16 logits come back at least fp32."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 6, 11, dtype=torch.float64) * 8).to(dtype)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :2], labels[2] = IGNORE_INDEX, IGNORE_INDEX
    weights = torch.randn(3, 5, dtype=torch.float64)
    grads = []
    for fused in (False, True):
        x = logits.clone().requires_grad_(True)
        if fused:
            logps, entropy, mask = token_logps_entropy(x, labels)
        else:
            (logps, mask), entropy = token_logps(x, labels), token_entropy(x.detach(), labels[:, 1:] != IGNORE_INDEX)
        assert logps.dtype == entropy.dtype == torch.promote_types(dtype, torch.float32)
        assert not entropy.requires_grad
        (logps * weights.to(logps.dtype)).sum().backward()
        grads.append((logps.detach(), entropy, mask, x.grad))
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-5}
    torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
    torch.testing.assert_close(grads[1][1], grads[0][1], **tol)
    assert torch.equal(grads[1][2], grads[0][2])
    torch.testing.assert_close(grads[1][3], grads[0][3], **({"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16
                                                            else tol))
    assert grads[1][0][2].abs().sum() == 0 and grads[1][3][2].abs().sum() == 0  # all masked: no value, no grad


def test_fused_logps_refuse_a_second_backward():
    """The backward turns the saved softmax into the gradient in place: a second one would be wrong, so it is
    refused (this is also why gradcheck, which backpropagates once per output, cannot run on it)."""
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 1, 4, 0], [2, 3, IGNORE_INDEX, 1]])
    logps, _, _ = token_logps_entropy(logits, labels)
    logps.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        logps.sum().backward()


def test_math_modules_do_not_import_heavy_frameworks():
    """Importing the math modules in a fresh interpreter pulls in none of ray/deepspeed/vllm/transformers."""
    code = (
        "import sys, unipipe_ray.core.logps, unipipe_ray.core.losses, unipipe_ray.core.rl\n"
        "print(sorted(m for m in ('ray', 'deepspeed', 'vllm', 'transformers') if m in sys.modules))"
    )
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
