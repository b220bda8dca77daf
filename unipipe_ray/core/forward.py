"""Per-token and per-sequence log-probs of a batch through the model's own forward.

Why a second path: the Hugging Face forward ends with the LM head, which builds (B, T, V) logits that
``token_logps`` then upcasts to fp32 and keeps for backward. At SmolLM2's vocabulary (49,152) a DPO batch
of 16 rows x 512 tokens is 1.6 GB of fp32 logits, and on a CPU the head's matmul over every position
(prompt and padding included) is most of the step for small models. With ``chunk_size`` set, the LM head
is bypassed for the forward, which then returns the final hidden states (B, T, H), and
``logps.chunked_token_logps`` scores only the real target tokens, chunk_size rows at a time.

``model`` is what runs the forward: the plain model, or its DDP / DeepSpeed wrapper (``runtime.engine.TrainingEngine``),
called as usual so data-parallel hooks keep working. ``module`` is the plain Hugging Face model under it,
whose output embedding is swapped for an identity while the forward runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from unipipe_ray.core import packing as packing_lib
from unipipe_ray.core.logps import IGNORE_INDEX, chunked_token_logps, sequence_logps, token_logps


@contextmanager
def lm_head_bypassed(module) -> Iterator[torch.nn.Module]:
    """Swap ``module``'s output embedding for an identity (its forward then returns hidden states as
    ``.logits``); yield the original head and put it back on exit, also on an exception."""
    head = module.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or getattr(head.weight, "ds_id", None) is not None:
        # chunked_token_logps takes a bias-free (V, H) matrix held whole: not a ZeRO-3 partition.
        raise ValueError("the chunked path needs a bias-free LM head with its full weight "
                         "(not ZeRO-3 partitioned); use chunk_size=None")
    config = getattr(module, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        raise ValueError("the chunked path computes plain hidden @ weight.T logits; this model rescales its "
                         "logits: use chunk_size=None")
    module.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        module.set_output_embeddings(head)


def token_logps_of(model, module, batch: dict, chunk_size: int | None = None, packing: bool | str = False):
    """Log-probs of a right-padded batch (input_ids, attention_mask, labels; all (N, T)).

    chunk_size None: full logits then ``token_logps``. An int: hidden states then ``chunked_token_logps``
    (same values and gradients, tied or untied embeddings). packing (True, or "auto" where it drops enough
    padding: ``packing.chosen_layout``): the forward runs on the sequences packed without padding, and the
    log-probs come back in the padded layout, so callers and their loss normalisers are those of the padded
    path. Returns (logps (N, T-1) fp32, mask (N, T-1)).
    """
    layout = packing_lib.chosen_layout(batch["attention_mask"], module, packing)
    if layout is None:
        # use_cache=False: a training forward has no use for a KV cache, and HF would build one by default
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        return _logps(model, module, inputs, batch["labels"], chunk_size)
    packed = packing_lib.pack(batch, layout)
    # no attention mask: HF then keeps attention inside each sequence from where position_ids restart; it
    # only does so without a KV cache (use_cache=False)
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"], "use_cache": False}
    logps, _ = _logps(model, module, inputs, packed["labels"], chunk_size)
    width = batch["input_ids"].shape[1]
    return packing_lib.unpack_shifted(logps, layout, width), batch["labels"][:, 1:] != IGNORE_INDEX


def _logps(model, module, inputs: dict, labels, chunk_size: int | None):
    if chunk_size is None:
        return token_logps(model(**inputs).logits, labels)
    with lm_head_bypassed(module) as head:
        hidden = model(**inputs).logits
    # the head's weight is the same Parameter after the swap-back (tied or not): gradients reach it
    return chunked_token_logps(hidden, head.weight, labels, chunk_size)


def sequence_pair_logps(model, module, batch: dict, chunk_size: int | None = None,
                        average: bool = False, packing: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of a (2B, T) preference batch (``data.collate_preference``: B chosen rows, then
    B rejected) -> (chosen (B,), rejected (B,)); sums, or means over real tokens with average=True."""
    return sequence_logps(*token_logps_of(model, module, batch, chunk_size, packing), average=average).chunk(2)
