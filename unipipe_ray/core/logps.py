"""Per-token and per-sequence log-probs of causal LMs.

The shift-by-one lives here and nowhere else: labels are aligned with input_ids (the Hugging Face
convention, `IGNORE_INDEX` = ignored), and position t of the logits predicts label t + 1. Every function
returns tensors of length T - 1 with a bool mask of the real (predicted) tokens.

Imports only torch: the math modules never pull in ray, deepspeed, vllm or transformers.
"""

import torch

IGNORE_INDEX = -100


def _upcast(x):
    """At least fp32: bf16/fp16 logits are upcast, float64 (used by exact tests) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _shift(labels):
    """labels (B, T) -> (targets (B, T-1) with ignored ids replaced by 0, mask (B, T-1) bool)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # gather needs a valid index everywhere; masked positions are zeroed afterwards
    return targets.masked_fill(~mask, 0), mask


def token_logps(logits, labels):
    """Log-probs of the next tokens: log p(labels[:, t+1] | logits[:, t]).

    logits (B, T, V) any float dtype, labels (B, T) long with IGNORE_INDEX for ignored tokens.
    Returns (logps (B, T-1) fp32 (float64 for float64 inputs) with 0 where masked, mask (B, T-1) bool).
    """
    targets, mask = _shift(labels)
    # autograd keeps one fp32 copy (logsumexp saves its input); log_softmax would save a second
    # (B, T, V) output for backward
    logits = _upcast(logits[:, :-1])
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logps = target_logits - torch.logsumexp(logits, dim=-1)
    return logps.masked_fill(~mask, 0.0), mask


def sequence_logps(logps, mask, average=False):
    """Sum (or mean over real tokens, e.g. for SimPO's length normalisation) of per-token log-probs.

    logps (B, T), mask (B, T) -> (B,).
    """
    total = torch.where(mask.bool(), logps, 0.0).sum(-1)
    if not average:
        return total
    # a sequence with no real tokens gets 0 rather than nan
    return total / mask.sum(-1).clamp(min=1)


def token_entropy(logits, mask):
    """Entropy of the next-token distribution at each position, with token_logps' shift.

    logits (B, T, V), mask (B, T-1) as returned by token_logps -> (B, T-1) fp32 (float64 for float64
    inputs), 0 where masked.
    """
    logp = torch.log_softmax(_upcast(logits[:, :-1]), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy.masked_fill(~mask.bool(), 0.0)


class _LogpsEntropy(torch.autograd.Function):
    """log softmax(logits)[target] and the entropy of softmax(logits), per row, from one log-softmax.

    logits (..., V) fp32 or fp64, targets (...) long -> (logps (...), entropy (...)); the entropy carries no
    gradient. Why a Function: autograd through logsumexp and a separate entropy pass touch the (N, K, V)
    logits about 16 times (each a fresh 400 MB tensor at GRPO's 32 x 65 x 49k, where allocating is most of
    the cost on CPU); here the forward makes one new tensor (the softmax, kept for backward) and the backward
    turns that same tensor into the gradient, onehot(target) - softmax, in place.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        logp = torch.log_softmax(logits, dim=-1)
        target_logps = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        log_normaliser = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - target_logps
        probs = logp.exp_()
        entropy = log_normaliser - torch.linalg.vecdot(probs, logits)  # log Z - E_p[logit]
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(entropy)
        ctx.used = False
        return target_logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        if ctx.used:  # the saved softmax became the first call's gradient
            raise RuntimeError("token_logps_entropy's graph can be backpropagated once (retain_graph is not "
                               "supported)")
        ctx.used = True
        probs, targets = ctx.saved_tensors
        grad = probs.mul_(-grad_logps.unsqueeze(-1))
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))
        return grad, None


def token_logps_entropy(logits, labels):
    """``token_logps`` and ``token_entropy`` of the same logits in one pass: (logps, entropy, mask), each
    (B, T-1), 0 where masked; gradients flow through the log-probs only (the same as token_logps'), and the
    graph backpropagates once.

    The last position (it predicts nothing) goes through with a dummy target instead of being sliced off:
    a slice's gradient would be one more (B, T, V) tensor.
    """
    targets, mask = _shift(labels)
    padded = torch.cat([targets, targets.new_zeros(targets.shape[0], 1)], dim=1)
    logps, entropy = _LogpsEntropy.apply(_upcast(logits), padded)
    return logps[:, :-1].masked_fill(~mask, 0.0), entropy[:, :-1].masked_fill(~mask, 0.0), mask


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] for N rows, in chunks, never holding (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,) -> logps (N,) at least fp32. Backward recomputes each
    chunk's softmax, using d logp_target / d logits = onehot(target) - softmax(logits).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logps = hidden.new_empty(hidden.shape[0], dtype=out_dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            # matmul in the input dtype, like the model's own LM head, then upcast
            logits = _upcast(hidden[rows] @ weight.T)
            target_logits = logits.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
            logps[rows] = target_logits - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # accumulate the weight gradient in fp32 (bf16 inputs) over chunks, cast once at the end
        grad_weight = torch.zeros_like(weight, dtype=grad_logps.dtype) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            grad_out = grad_logps[rows].unsqueeze(1)
            grad_logits = -torch.softmax(_upcast(h @ weight.T), dim=-1) * grad_out
            grad_logits.scatter_add_(1, targets[rows].unsqueeze(1), grad_out)
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight += grad_logits.T @ h
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_token_logps(hidden, weight, labels, chunk_size=1024):
    """token_logps(hidden @ weight.T, labels) without building the (B, T, V) logits.

    hidden (B, T, H) final hidden states (before the LM head), weight (V, H) the LM-head matrix
    (no bias), labels (B, T). Only the real target positions are computed, chunk_size rows at a time,
    so peak extra memory is (chunk_size, V) fp32 instead of (B, T, V).
    Returns (logps (B, T-1) fp32 (float64 for float64 inputs) with 0 where masked, mask (B, T-1) bool).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets, mask = _shift(labels)
    rows = mask.flatten().nonzero().squeeze(1)
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[rows]
    selected_logps = _ChunkedTargetLogps.apply(selected, weight, targets.flatten()[rows], chunk_size)
    logps = selected_logps.new_zeros(mask.numel()).index_put((rows,), selected_logps)
    return logps.view(mask.shape), mask
