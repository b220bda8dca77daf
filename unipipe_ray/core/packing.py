"""Padding-free packing: a right-padded batch's sequences laid side by side in a few rows for the forward.

Why: a padded batch runs every row to its longest sequence, so with very different lengths (HH pairs: about
half the positions) the linear layers spend that share on padding. Packed, sequence i's tokens sit at
``starts[i]`` onwards in the flat (rows * width) layout, ``position_ids`` restart at 0 for each sequence, and
the forward gets no attention mask: Hugging Face's mask builder (``transformers.masking_utils``, used by
sdpa, eager and flex attention) then reads each sequence's bounds from where the positions restart
(``find_packed_sequence_indices``) and keeps attention inside it. Flash-attention's varlen path reads the same
bounds, but only from a single row (``_is_packed_sequence`` wants batch size 1), so for it all goes in one row.

Otherwise the rows are at most as wide as the padded batch (first-fit decreasing into bins of the longest
length): a row's dense attention mask (sdpa / eager on CPU) then never costs more than a padded row's. What a
row has left over at its end is filler: token 0, its own run of positions (a sequence of its own that no real
token attends to), label ignored.

Only the forward sees packed rows. ``unpack_shifted`` puts each per-token value back at its padded place,
so masks, per-sequence sums and loss normalisers are computed exactly as on the padded path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unipipe_ray.core.logps import IGNORE_INDEX


@dataclass(frozen=True)
class Layout:
    """Where each sequence of a padded (N, T) batch sits in the packed (rows, width) batch."""

    rows: int
    width: int
    lengths: tuple[int, ...]  # real tokens of each padded row
    starts: tuple[int, ...]   # flat index (row * width + offset) of each sequence's first token

    @property
    def size(self) -> int:
        return self.rows * self.width


def plan(lengths: list[int], capacity: int) -> Layout:
    """First-fit decreasing of ``lengths`` into rows of at most ``capacity`` tokens (ties in input order, so the
    layout is a pure function of the lengths). The width is the fullest row's."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"packing needs sequences of at least one token, got lengths {lengths}")
    if capacity < max(lengths):
        raise ValueError(f"row capacity {capacity} is below the longest sequence ({max(lengths)})")
    used: list[int] = []
    place = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, u in enumerate(used) if u + lengths[i] <= capacity), len(used))
        if row == len(used):
            used.append(0)
        place[i], used[row] = (row, used[row]), used[row] + lengths[i]
    width = max(used)
    return Layout(len(used), width, tuple(lengths), tuple(r * width + off for r, off in place))


def layout_of(attention_mask: torch.Tensor, one_row: bool = False) -> Layout:
    """The layout of a right-padded batch: rows no wider than the batch, or everything in one row."""
    lengths = attention_mask.sum(1).tolist()
    return plan(lengths, sum(lengths) if one_row else max(lengths))


def needs_one_row(module) -> bool:
    """Flash-attention finds packed sequences only in a batch of one row (see the module docstring)."""
    return "flash" in str(getattr(getattr(module, "config", None), "_attn_implementation", "") or "")


def layout_for(attention_mask: torch.Tensor, module) -> Layout:
    """The layout ``module``'s attention implementation can run: rows, or one row under flash-attention."""
    return layout_of(attention_mask, one_row=needs_one_row(module))


# auto: pack a micro-batch when packing drops at least this share of its positions. Packed and padded give
# the same losses and gradients, so the choice is per micro-batch and only about speed: with little padding
# to drop, the gather and scatter around the forward are not paid back.
AUTO_MIN_SAVING = 0.2


def chosen_layout(attention_mask: torch.Tensor, module, packing) -> Layout | None:
    """The packed layout to run a right-padded batch in, or None for the padded forward. ``packing``: True,
    False or "auto" (packed when that drops at least AUTO_MIN_SAVING of the padded positions)."""
    if not packing:
        return None
    layout = layout_for(attention_mask, module)
    if packing == "auto" and layout.size > (1 - AUTO_MIN_SAVING) * attention_mask.numel():
        return None
    return layout


def _token_indices(layout: Layout, padded_width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the padded (N, T) batch, the same tokens' flat indices in the packed batch)."""
    lengths = torch.tensor(layout.lengths, device=device)
    seq = torch.repeat_interleave(torch.arange(len(layout.lengths), device=device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum()), device=device) - first[seq]
    starts = torch.tensor(layout.starts, device=device)
    return seq * padded_width + within, starts[seq] + within


def _positions(layout: Layout, device) -> torch.Tensor:
    """Flat (rows * width) position ids: 0 at each sequence's start, at each row's filler, counting up."""
    marks = torch.zeros(layout.size, dtype=torch.bool, device=device)
    marks[list(layout.starts)] = True
    ends = torch.zeros(layout.rows, dtype=torch.long)
    for start, n in zip(layout.starts, layout.lengths, strict=True):
        ends[start // layout.width] = max(int(ends[start // layout.width]), start % layout.width + n)
    fillers = [r * layout.width + int(e) for r, e in enumerate(ends) if e < layout.width]
    marks[fillers] = True
    index = torch.arange(layout.size, device=device)
    return index - torch.cummax(torch.where(marks, index, 0), 0).values


def pack(batch: dict, layout: Layout) -> dict:
    """A right-padded batch (input_ids, labels; (N, T)) -> input_ids, position_ids, labels: (rows, width).

    Each sequence's first label is ignored: in the padded layout it sits in column 0, which the shift by one
    drops, but packed, the token before it is the last one of another sequence."""
    ids = batch["input_ids"]
    src, dst = _token_indices(layout, ids.shape[1], ids.device)
    out = {"input_ids": ids.new_zeros(layout.size).index_put_((dst,), ids.flatten()[src]),
           "position_ids": _positions(layout, ids.device)}
    if "labels" in batch:
        labels = batch["labels"].new_full((layout.size,), IGNORE_INDEX)
        labels.index_put_((dst,), batch["labels"].flatten()[src])
        labels[list(layout.starts)] = IGNORE_INDEX
        out["labels"] = labels
    return {k: v.view(layout.rows, layout.width) for k, v in out.items()}


def unpack_shifted(values: torch.Tensor, layout: Layout, padded_width: int) -> torch.Tensor:
    """Per-target values of the packed batch (rows, width - 1; position t predicts t + 1, as ``core.logps``)
    -> the padded batch's (N, T - 1), 0 where a row has no target. Differentiable (a gather and a scatter)."""
    device = values.device
    src, dst = _token_indices(layout, padded_width, device)
    keep = torch.ones_like(src, dtype=torch.bool)
    keep[torch.cumsum(torch.tensor(layout.lengths, device=device), 0) - 1] = False  # a last token predicts nothing
    src, dst = src[keep], dst[keep]
    n = len(layout.lengths)
    # flat index in the (N, T-1) grid: row * (T-1) + t, from row * T + t; likewise for the packed grid
    rows_out, cols_out = src // padded_width, src % padded_width
    rows_in, cols_in = dst // layout.width, dst % layout.width
    picked = values.reshape(-1)[rows_in * (layout.width - 1) + cols_in]
    out = values.new_zeros(n * (padded_width - 1))
    return out.index_put((rows_out * (padded_width - 1) + cols_out,), picked).view(n, padded_width - 1)


def last_token_indices(layout: Layout) -> torch.Tensor:
    """Flat packed index of each sequence's last token (where a reward head reads)."""
    return torch.tensor([s + n - 1 for s, n in zip(layout.starts, layout.lengths, strict=True)])


@torch.no_grad()
def check_model_packs(model, rtol: float = 5e-2) -> None:
    """Refuse packing for a model whose attention ignores the restarting positions (its mask not built by
    ``transformers.masking_utils``): its packed sequences would attend to each other, silently. Two short
    sequences run packed in one row and the second alone; its last hidden states must agree. Every rank
    calls this at the same point (under ZeRO-3 the forward gathers parameters collectively)."""
    device, training = next(model.parameters()).device, model.training
    model.eval()  # no dropout: the probe must not draw from the training's random streams
    first, second = torch.arange(3, 9, device=device), torch.arange(20, 25, device=device)
    packed = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))]).to(device)[None]
    together = model(input_ids=packed, position_ids=positions, use_cache=False,
                     output_hidden_states=True).hidden_states[-1][0, len(first):].float()
    alone = model(input_ids=second[None], position_ids=positions[:, len(first):], use_cache=False,
                  output_hidden_states=True).hidden_states[-1][0].float()
    model.train(training)
    # Leaking attention moves the states by their own size; rounding (bf16 included) by far less than rtol.
    gap = float((together - alone).abs().max())
    if gap > rtol * max(1.0, float(alone.abs().max())):
        raise ValueError(f"train.packing: {type(model).__name__} lets packed sequences attend to each other "
                         f"(hidden states differ by {gap:.3g}): its attention mask does not come from "
                         "transformers' masking_utils; set train.packing: false for this model")
