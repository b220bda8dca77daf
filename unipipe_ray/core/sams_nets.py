"""Pieces of the SamS scheduler (Huang et al. 2025, arXiv 2506.17252): pooled layer features, connector, layer
encoder, residual MLP, and a private RNG scope. `unipipe_ray.core.sams` wires them together. Imports only torch.
"""

from contextlib import contextmanager

import torch
from torch import nn


def connector(hidden_size, width, context_size):
    """Maps each layer's pooled hidden vector into the encoder's width (paper: d -> 1024 -> 384, ReLU after
    both). (n, L, d) -> (n, L, context_size)."""
    return nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, context_size), nn.ReLU())


class LayerEncoder(nn.Module):
    """A small learned stand-in for all-MiniLM-L6-v2's transformer: reads the L policy layers as a sequence.

    forward(embeds (n, L, C), mask (n, L) bool, True = real) -> (n, L, C). Any module with this signature
    (e.g. a wrapper around the frozen MiniLM) can replace it.
    """

    def __init__(self, num_positions, width, layers, heads, ff_width):
        super().__init__()
        # a learned position per policy layer: without it, attention + mean pooling could not tell the layers
        # apart (MiniLM brings its own position embeddings)
        self.position = nn.Parameter(torch.randn(num_positions, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, ff_width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    def forward(self, embeds, mask):
        return self.encoder(embeds + self.position, src_key_padding_mask=~mask)


class ResidualMLP(nn.Module):
    """The scheduler nets f_S and f_S' (paper: 16 blocks of width 4096; EE-Net style).

    h_0 = ReLU(W_in x);  h_i = LayerNorm(h_{i-1} + Dropout(ReLU(W_i h_{i-1}))), i = 1..depth;  y = w_out h_depth.
    forward(x (n, in_size)) -> (y (n,), hidden (n, depth * width)), hidden = [h_1, ..., h_depth] concatenated,
    the input of f_S' (after block-mean downsampling).
    """

    def __init__(self, in_size, width, depth, dropout):
        super().__init__()
        self.inp = nn.Linear(in_size, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        hidden = []
        for block, norm in zip(self.blocks, self.norms, strict=True):
            h = norm(h + self.dropout(torch.relu(block(h))))
            hidden.append(h)
        return self.out(h).squeeze(-1), torch.cat(hidden, dim=-1)


def downsample(x, factor):
    """Block-mean downsampling of f_S's activations into f_S''s input (paper: factor 4; code: 16).
    x (n, m) -> (n, m // factor); m must be a multiple of factor."""
    return x.view(x.shape[0], -1, factor).mean(-1)


def layer_features(chosen_hidden, rejected_hidden, chosen_mask, rejected_mask=None):
    """Arm context before the encoder (paper: chosen and rejected hidden states averaged element-wise, then over
    tokens). chosen_hidden / rejected_hidden: L tensors (n, T, d), one per transformer block (HF
    `hidden_states[1:]`); masks (n, T), True on real tokens. Returns (n, L, d) float32, no grad.

    Computed as 0.5 * (token mean of chosen + token mean of rejected) over real tokens only: equal to the paper's
    element-wise average for unpadded pairs of one length, unlike the authors' code, which averages padding in.
    rejected_hidden=None pools one sequence (SFT-time pretraining).
    """
    with torch.no_grad():
        pooled = _masked_layer_mean(chosen_hidden, chosen_mask)
        if rejected_hidden is not None:
            pooled = 0.5 * (pooled + _masked_layer_mean(rejected_hidden, rejected_mask))
    return pooled


def _masked_layer_mean(hidden, mask):
    """L tensors (n, T, d), mask (n, T) -> (n, L, d) float32: mean over real tokens, one layer at a time."""
    real = mask.bool().unsqueeze(-1)  # (n, T, 1)
    count = mask.sum(-1, keepdim=True).clamp(min=1).float()
    # where() rather than a product with the mask: a nan or inf in a padded position must not leak in
    return torch.stack([torch.where(real, h, 0).sum(1, dtype=torch.float32) / count for h in hidden], dim=1)


class LayerPooler:
    """Arm features taken by forward hooks while the policy's forward runs: each block's output is mean-pooled
    over real tokens as soon as it exists, so the L (N, T, d) hidden states are never held together
    (output_hidden_states keeps them all: for SmolLM2 31 x N x T x 576 floats, more than a DPO step's logits).

        with LayerPooler(model, mask) as pooler:   # mask (N, T), True on real tokens
            model(...)
        pooled = pooler.features()                 # (N, L, d) float32

    Same values as `_masked_layer_mean(HF hidden_states[1:])`: HF's last entry is after the final norm, so the
    last block is read at the norm. Needs a decoder with `.layers` and `.norm` (Llama, Qwen, Mistral, ...);
    `supports(model)` says whether it has them.
    """

    def __init__(self, model, mask):
        decoder = model.get_decoder()
        self.modules = list(decoder.layers[:-1]) + [decoder.norm]
        self.mask, self.pooled, self.handles = mask, [None] * len(self.modules), []

    @staticmethod
    def supports(model):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        return hasattr(decoder, "layers") and hasattr(decoder, "norm")

    def __enter__(self):
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i):
        def pool(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.pooled[i] = _masked_layer_mean([hidden.detach()], self.mask)[:, 0]

        return pool

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def features(self):
        return torch.stack(self.pooled, dim=1)


@torch.no_grad()
def arm_forward(model, batch, chunk_size=None):
    """The policy's no-grad view of a batch (input_ids, attention_mask, labels; (N, T)) for SamS: per-layer
    features pooled over real tokens (N, L, d) and token log-probs (N, T-1) with their mask. The LM head runs
    chunked as in training (no full (N, T, V) logits), the blocks' outputs are pooled on the fly (LayerPooler);
    a model without `.layers` / `.norm` falls back to output_hidden_states."""
    from unipipe_ray.core.forward import token_logps_of
    from unipipe_ray.core.logps import token_logps

    mask = batch["attention_mask"].bool()
    if LayerPooler.supports(model):
        with LayerPooler(model, mask) as pooler:
            logps, logps_mask = token_logps_of(model, model, batch, chunk_size)
        return pooler.features(), logps, logps_mask
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return _masked_layer_mean(out.hidden_states[1:], mask), *token_logps(out.logits, batch["labels"])


@contextmanager
def private_rng(seed, device):
    """Run the block on the global RNG reseeded from `seed`, then restore it: init and dropout draw from the
    global generator, and the policy's own random stream must not shift because the scheduler ran."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
