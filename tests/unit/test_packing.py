"""Padding-free packing (core/packing.py): the layout, the pack / unpack round trip, and the packed forward
giving the padded path's log-probs, losses and gradients (SFT, DPO, RM) on the tiny Llama in fp32, on a
batch whose lengths differ tenfold. A packed forward whose positions do not restart (attention leaks across
sequences) is shown to fail the same comparison."""

import pytest
import torch

from unipipe_ray.core import packing
from unipipe_ray.core.forward import sequence_pair_logps, token_logps_of
from unipipe_ray.core.logps import IGNORE_INDEX
from unipipe_ray.core.losses import bradley_terry_loss, dpo_loss, reduce_loss, sft_loss
from unipipe_ray.core.models import load_causal_lm, tiny_model_dir
from unipipe_ray.core.reward_head import pair_rewards
from unipipe_ray.data import collate_preference, collate_sft

PAD = 0
LENGTHS = [5, 60, 23, 11, 2, 37]  # tenfold differences; a 2-token sequence has one target


def _features(lengths, seed=0, prompt=3):
    """Random token sequences; the first min(prompt, n - 1) tokens are prompt (label ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 500, (n,), generator=g).tolist()
        k = min(prompt, n - 1)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * k + ids[k:]})
    return out


def _pairs(chosen_lengths, rejected_lengths, seed=1):
    chosen, rejected = _features(chosen_lengths, seed), _features(rejected_lengths, seed + 1)
    return [{"chosen_input_ids": c["input_ids"], "chosen_labels": c["labels"],
             "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"]}
            for c, r in zip(chosen, rejected, strict=True)]


# --- the layout -------------------------------------------------------------------------------------------


def test_plan_is_first_fit_decreasing_within_the_longest_length():
    layout = packing.plan([5, 60, 30, 20, 8], capacity=60)
    # 60 | 30 + 20 + 8 | 5 (5 fits neither 60 nor 58)
    assert (layout.rows, layout.width) == (3, 60)
    assert layout.starts == (120, 0, 60, 90, 110)
    one = packing.plan([5, 60, 30, 20, 8], capacity=123)
    assert (one.rows, one.width) == (1, 123) and one.starts == (118, 0, 60, 90, 110)


def test_plan_refuses_what_it_cannot_pack():
    for lengths, capacity in (([], 4), ([3, 0], 4), ([5, 2], 4)):
        with pytest.raises(ValueError):
            packing.plan(lengths, capacity)


def test_flash_attention_gets_a_single_row():
    class Config:
        _attn_implementation = "flash_attention_2"

    class Module:
        config = Config()

    assert packing.needs_one_row(Module())
    Config._attn_implementation = "sdpa"
    assert not packing.needs_one_row(Module())


# --- pack and unpack ----------------------------------------------------------------------------------------


def test_pack_places_every_token_with_restarting_positions():
    from transformers.masking_utils import find_packed_sequence_indices

    batch = collate_sft(_features(LENGTHS), PAD)
    layout = packing.layout_of(batch["attention_mask"])
    packed = packing.pack(batch, layout)
    assert packed["input_ids"].shape == (layout.rows, layout.width) and layout.width == max(LENGTHS)
    assert layout.rows * layout.width < batch["input_ids"].numel()  # less than the padded batch
    ids, pos, labels = (packed[k].flatten() for k in ("input_ids", "position_ids", "labels"))
    filled = torch.zeros_like(ids, dtype=torch.bool)
    for i, (start, n) in enumerate(zip(layout.starts, LENGTHS, strict=True)):
        span = slice(start, start + n)
        assert start % layout.width + n <= layout.width  # inside one row
        assert torch.equal(ids[span], batch["input_ids"][i, :n])
        assert pos[span].tolist() == list(range(n))
        assert labels[start] == IGNORE_INDEX  # the first token is never a target
        assert torch.equal(labels[start + 1:start + n], batch["labels"][i, 1:n])
        filled[span] = True
    assert labels[~filled].eq(IGNORE_INDEX).all()  # filler never counts
    # what transformers reads from the positions: each sequence one segment, no two in a row sharing one
    segments = find_packed_sequence_indices(packed["position_ids"]).flatten()
    seen = set()
    for start, n in zip(layout.starts, LENGTHS, strict=True):
        assert segments[start:start + n].unique().numel() == 1
        seen.add((start // layout.width, int(segments[start])))
    assert len(seen) == len(LENGTHS)


@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one_row"])
def test_unpack_inverts_pack_for_shifted_values(one_row):
    """Packed values at position p describe token p + 1 (the log-prob layout); unpacked they must sit at the
    padded (row, t) that predicts token t + 1, with 0 past each sequence's last target."""
    batch = collate_sft(_features(LENGTHS), PAD)
    layout = packing.layout_of(batch["attention_mask"], one_row=one_row)
    packed_ids = packing.pack(batch, layout)["input_ids"].double()
    back = packing.unpack_shifted(packed_ids[:, 1:], layout, batch["input_ids"].shape[1])
    expected = batch["input_ids"][:, 1:].double() * batch["attention_mask"][:, 1:]
    assert torch.equal(back, expected)


# --- the packed forward equals the padded one ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    torch.manual_seed(0)
    m = load_causal_lm("tiny").float().train()
    m.set_attn_implementation(request.param)
    return m


def _grads(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [None, 7], ids=["full_logits", "chunked"])
def test_sft_packed_equals_padded_loss_and_gradients(model, chunk):
    batch = collate_sft(_features(LENGTHS), PAD)
    normalizer = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(packed):
        logps = token_logps_of(model, model, batch, chunk, packing=packed)
        return sft_loss(*logps, mode="token", normalizer=normalizer)

    padded, packed = _grads(model, lambda: loss(False)), _grads(model, lambda: loss(True))
    _assert_same(padded, packed)
    (logps, mask), (plogps, pmask) = (token_logps_of(model, model, batch, chunk, packing=p) for p in (False, True))
    assert torch.equal(mask, pmask) and torch.all(plogps[~pmask] == 0)
    torch.testing.assert_close(plogps, logps, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("average", [False, True], ids=["dpo_sums", "simpo_means"])
def test_dpo_packed_equals_padded_loss_and_gradients(model, average):
    batch = collate_preference(_pairs([5, 60, 14], [58, 6, 31]), PAD)
    ref = (torch.tensor([-40.0, -300.0, -90.0]), torch.tensor([-290.0, -35.0, -160.0]))

    def loss(packed):
        chosen, rejected = sequence_pair_logps(model, model, batch, chunk_size=7, average=average, packing=packed)
        losses, _, _ = dpo_loss(chosen, rejected, *ref, beta=0.1)
        # unequal weights per pair: a mix-up between pairs or sides would show in the gradient
        return reduce_loss(losses * torch.tensor([1.0, 2.0, 3.0]), mode="example", normalizer=3)

    _assert_same(_grads(model, lambda: loss(False)), _grads(model, lambda: loss(True)))


def test_rm_packed_equals_padded_loss_and_gradients():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir(), num_labels=1).float().train()
    rm.config.pad_token_id = PAD
    batch = collate_preference(_pairs([5, 60, 14], [58, 6, 31]), PAD)

    def loss(packed):
        chosen, rejected = pair_rewards(rm, rm, batch, packing=packed)
        return reduce_loss(bradley_terry_loss(chosen, rejected)[0], mode="example", normalizer=3)

    _assert_same(_grads(rm, lambda: loss(False)), _grads(rm, lambda: loss(True)))


def test_attention_leaking_across_packed_sequences_is_caught(model, monkeypatch):
    """The planted bug: positions that never restart (one long sequence per row), so every token attends to
    the sequences packed before it. The comparison above must fail on it."""
    batch = collate_sft(_features(LENGTHS), PAD)
    real = packing._positions
    monkeypatch.setattr(packing, "_positions",
                        lambda layout, device: torch.arange(layout.size, device=device) % layout.width)
    with torch.no_grad():
        leaky, _ = token_logps_of(model, model, batch, 7, packing=True)
        monkeypatch.setattr(packing, "_positions", real)
        padded, mask = token_logps_of(model, model, batch, 7)
    assert (leaky - padded)[mask].abs().max() > 1e-2


def test_a_model_whose_attention_ignores_packing_is_refused():
    """The stage loop probes the model before training (core/packing.check_model_packs): Llama passes; a
    model that builds its own full mask (here: one that always passes an all-ones attention mask, so the
    packed sequences see each other) is refused with a message naming the switch."""
    import torch
    from transformers import AutoModelForCausalLM

    from unipipe_ray.core.models import tiny_model_dir
    from unipipe_ray.core.packing import check_model_packs

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32).train()
    check_model_packs(model)
    assert model.training  # left as it was

    class Leaky(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kw):
            return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)

    with pytest.raises(ValueError, match="train.packing: Leaky lets packed sequences attend"):
        check_model_packs(Leaky(model))
    # the stage loop: packing: true refuses it; auto (the default) trains it on padded batches, and says so
    from unipipe_ray.config import TrainConfig
    from unipipe_ray.runtime.loop import packing_checked

    with pytest.raises(ValueError, match="Leaky lets packed sequences attend"):
        packing_checked(Leaky(model), TrainConfig(packing=True))
    assert packing_checked(Leaky(model), TrainConfig()).packing is False
    assert packing_checked(model, TrainConfig()).packing == "auto"


def test_auto_packs_a_batch_only_when_that_drops_enough_padding():
    """packing: auto (the default) packs a micro-batch when that drops >= AUTO_MIN_SAVING of its positions:
    lengths 60 / 5 / 2 fit in 2 rows of 60 instead of 3; three equal lengths save nothing."""
    uneven = collate_sft(_features([60, 5, 2]), PAD)["attention_mask"]
    even = collate_sft(_features([30, 29, 30]), PAD)["attention_mask"]
    model = load_causal_lm(tiny_model_dir())
    assert packing.chosen_layout(uneven, model, False) is None
    assert packing.chosen_layout(even, model, True).rows == 3  # true: always packed, even at no saving
    assert packing.chosen_layout(even, model, "auto") is None
    layout = packing.chosen_layout(uneven, model, "auto")
    assert (layout.rows, layout.width) == (2, 60)


def test_the_packing_switch_takes_true_false_or_auto():
    from unipipe_ray.config import ConfigError, SFTConfig, load_config

    assert load_config(SFTConfig).train.packing == "auto"
    for text, value in (("true", True), ("false", False), ("auto", "auto")):
        assert load_config(SFTConfig, overrides=[f"train.packing={text}"]).train.packing == value
    for bad in ("1", "packed", "0.5"):  # (YAML reads yes / no as booleans)
        with pytest.raises(ConfigError, match="train.packing"):
            load_config(SFTConfig, overrides=[f"train.packing={bad}"])
