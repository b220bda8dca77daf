"""SamS pretraining during SFT: rewards from the SFT loss, lagged rounds, state, hand-off to DPO."""

import io
import math

import pytest
import torch

from unipipe_ray.core.sams import SamsScheduler, SamsSettings
from unipipe_ray.core.sams_pretrain import SftPretrainer, pretrained_nets, sft_arm_inputs, sft_rewards

torch.set_num_threads(1)

D, L = 8, 3
TINY = dict(encoder="learned", connector_width=16, context_size=8, encoder_layers=1, encoder_heads=2,
            encoder_ff_width=16, depth=2, width=16, train_steps=2, replay_batches=4, pool_size=5)


def tiny(seed=0, **overrides):
    return SamsScheduler(D, L, SamsSettings(**{**TINY, **overrides}), seed=seed)


def rounds(pretrainer, seed, n=3):
    gen = torch.Generator().manual_seed(seed)
    return [pretrainer.step(torch.randn(8, L, D, generator=gen), 1 + torch.rand(8, generator=gen)) for _ in range(n)]


def test_sft_rewards_hand_values():
    """prev losses [1, 2, 3] (M_{t-1} = 2), M_t = 1.5: r_B = (2 - 1.5) / 2 = 0.25, sigma_B = sigmoid(50 * 0.25 + 0.5)
    = sigmoid(13) = 0.99999774; g(loss) = [0, 0.5, 1]; labels = 0.5 sigma_B + 0.5 g = [0.49999887, 0.74999887,
    0.99999887]. A rising loss (M_t = 2.5): r_B = -0.5 / 2.5 = -0.2, sigma_B = sigmoid(-9.5) = 7.4852e-5."""
    labels, raw = sft_rewards(torch.tensor([1.0, 2.0, 3.0]), 1.5)
    assert raw == pytest.approx(0.25)
    torch.testing.assert_close(labels, torch.tensor([0.49999887, 0.74999887, 0.99999887]))
    labels, raw = sft_rewards(torch.tensor([1.0, 2.0, 3.0]), 2.5)
    assert raw == pytest.approx(-0.2) and labels[0].item() == pytest.approx(0.5 / (1 + math.exp(9.5)), rel=1e-4)


def test_pretraining_moves_connector_encoder_and_exploit_net_only():
    pretrainer = SftPretrainer(tiny())
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in pretrainer.sched.nets.items()}
    metrics = rounds(pretrainer, seed=0)
    assert metrics[0] == {} and math.isfinite(metrics[-1]["sams/pretrain_mse"])
    changed = {name for name, ps in before.items()
               if any(not torch.equal(a, b) for a, b in zip(ps, pretrainer.sched.nets[name].parameters()))}
    assert changed == {"connector", "encoder", "exploit"}


def test_pretrainer_state_round_trip_continues_identically():
    a = SftPretrainer(tiny(seed=0))
    rounds(a, seed=1)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = SftPretrainer(tiny(seed=5))
    b.load_state_dict(torch.load(buffer, weights_only=True))  # as the checkpoint's trainer_state.pt is read
    assert rounds(a, seed=2) == rounds(b, seed=2)
    probe = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    torch.testing.assert_close(a.sched.scores(probe), b.sched.scores(probe), rtol=0, atol=0)


def test_dpo_scheduler_starts_from_the_sft_checkpoints_nets(tmp_path):
    pretrainer = SftPretrainer(tiny())
    rounds(pretrainer, seed=3)
    torch.save({"step": 3, "metrics": {}, "extra": {"sams_pretrain": pretrainer.state_dict()}},
               tmp_path / "trainer_state.pt")
    dpo = tiny(seed=9)
    dpo.load_nets(pretrained_nets(tmp_path))
    features = torch.randn(6, L, D)
    torch.testing.assert_close(dpo.contexts(features), pretrainer.sched.contexts(features), rtol=0, atol=0)
    assert len(dpo.pool) == 0 and dpo.pending is None  # weights only: DPO's bandit history starts empty
    with pytest.raises(ValueError, match="sams settings"):
        tiny(width=32).load_nets(pretrained_nets(tmp_path))
    assert pretrained_nets(tmp_path / "missing") is None


def test_sft_arm_inputs_from_a_tiny_llama():
    """Features average the real tokens of each layer; losses are the token-mean NLL of the response tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[mask == 0] = -100
    features, losses = sft_arm_inputs(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert features.shape == (3, 2, 16) and losses.shape == (3,)
    with torch.no_grad():
        out = model(input_ids=ids[2:, :5], output_hidden_states=True)
        logps = torch.log_softmax(out.logits[0, 2:4], -1).gather(-1, ids[2, 3:5, None]).squeeze(-1)
    torch.testing.assert_close(features[2, 0], out.hidden_states[1][0].mean(0))
    torch.testing.assert_close(losses[2], -logps.mean())


@pytest.mark.parametrize("chunk", [None, 3])
def test_arm_forward_pools_blocks_on_the_fly_like_hidden_states(chunk):
    """Hooks give what output_hidden_states + layer_features give (the last block read after the final norm),
    and the chunked LM head the same log-probs as full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unipipe_ray.core.logps import token_logps
    from unipipe_ray.core.sams_nets import _masked_layer_mean, arm_forward

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids, mask = torch.randint(0, 40, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    hooks = sum(len(m._forward_hooks) for m in model.modules())  # transformers keeps some of its own
    pooled, logps, logps_mask = arm_forward(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                            chunk)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # ours removed
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(pooled, _masked_layer_mean(out.hidden_states[1:], mask.bool()))
    expected, expected_mask = token_logps(out.logits, labels)
    assert torch.equal(logps_mask, expected_mask)
    torch.testing.assert_close(logps, expected)
