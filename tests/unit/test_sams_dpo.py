"""SamS inside the DPO step, in-process (world size 1): PairSelector's scoring pass and the reference memo."""

import pytest
import torch

from unipipe_ray.config import DPOConfig, TrainConfig
from unipipe_ray.core.sams import SamsSettings
from unipipe_ray.stages.dpo_pairs import PairSelector, RefScorer, no_grad_chunk, pair_logps

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def pairs(n, T=6, seed=0):
    """(2n, T) preference batch: n chosen rows then n rejected, the first 2 tokens a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (2 * n, T), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class CountingRef(RefScorer):
    def __init__(self, model):
        super().__init__(model, chunk_size=None)
        self.rows_scored = 0

    def __call__(self, batch, keys):
        if not all(k in self.memo for k in keys):
            self.rows_scored += batch["input_ids"].shape[0]
        return super().__call__(batch, keys)


def test_reference_scores_each_pair_once_per_step(model):
    """The scoring pass remembers the reference's log-probs; the kept sub-batch reads them back, bitwise."""
    batch, keys = pairs(4), [("train", i) for i in range(4)]
    ref = CountingRef(model)
    full = ref.score_and_remember(batch, keys)
    kept = [1, 3]
    sub = {k: torch.cat([v[kept], v[[4 + j for j in kept]]]) for k, v in batch.items()}
    again = ref(sub, [keys[j] for j in kept])
    assert ref.rows_scored == 8
    torch.testing.assert_close(again[0], full[0][kept], rtol=0, atol=0)
    ref(pairs(1, seed=5), [("eval", 0)])  # keys it has not seen: scored by the model
    assert ref.rows_scored == 10


def test_sams_selector_keeps_k_pairs_and_scores_with_the_small_chunk(model):
    cfg = DPOConfig(scheduler="sams", keep_ratio=0.5, train=TrainConfig(logps_chunk_size=8),
                    sams=SamsSettings(encoder="learned", connector_width=16, context_size=8, encoder_layers=1,
                                      encoder_heads=2, encoder_ff_width=16, depth=2, width=16))
    selector, ref = PairSelector(cfg, model, seed=0, resumed={}), RefScorer(model, no_grad_chunk(8))
    assert no_grad_chunk(8) == 2 and no_grad_chunk(None) is None and no_grad_chunk(3) == 1
    for step in range(3):
        batch, keys = pairs(6, seed=step), [("train", 6 * step + i) for i in range(6)]
        kept, metrics = selector.keep(model, batch, ref, keys)
        assert len(kept) == 3 and kept == sorted(set(kept))
        assert set(ref.memo) == set(keys)
    assert metrics["sams/pool_batches"] == 2
    # the scoring pass's margins are the policy's own view: policy == reference here, so every margin is 0
    chosen, rejected = pair_logps(model, pairs(6, seed=2), chunk_size=2)
    assert torch.allclose(selector.sched.pending["margins"], torch.zeros(6), atol=1e-5)
    torch.testing.assert_close(selector.sched.pending["chosen_logps"], chosen)
