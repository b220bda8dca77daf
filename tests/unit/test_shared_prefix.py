"""The shared-prompt forward gives the plain forward's log-probs, entropies and gradients (float tolerance):
groups of different prompt lengths, responses of different lengths (one empty), the tiny model and SmolLM2's
architecture alike (both Llama-type; the tiny one is random, so every position matters)."""

import pytest
import torch

from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.core.sequences import (
    logits_to_keep,
    model_inputs,
    response_grid_logps,
    response_grid_logps_entropy,
    response_mask,
    to_batch,
)
from unipipe_ray.core.shared_prefix import shared_batch, shared_prefix_logits
from unipipe_ray.ppo.rollout import Sample


def samples():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (7, 3, 11)]
    lens = [[5, 2, 0, 9], [4, 4, 1, 6], [3, 8, 2, 7]]
    return [Sample(p, torch.randint(5, 200, (r,), generator=g).tolist(), [0.0] * r, True)
            for p, rs in zip(prompts, lens, strict=True) for r in rs]


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).train()


def plain(model, batch):
    return model(**model_inputs(batch), logits_to_keep=logits_to_keep(batch), use_cache=False).logits


def grads(model, logps, mask):
    model.zero_grad()
    (logps * mask).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_prefix_equals_the_plain_forward(model):
    rows = samples()
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [rows[i] for i in order]  # a group's samples need not be adjacent
    a, b = to_batch(rows, pad_id=0), shared_batch(rows, pad_id=0)
    assert b["prefix_ids"].shape[0] == 3 and b["input_ids"].shape[1] == logits_to_keep(a)
    la, lb = plain(model, a), shared_prefix_logits(model, b)
    mask = response_mask(a)
    pa, pb = response_grid_logps(la, a), response_grid_logps(lb, b)
    torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(response_grid_logps_entropy(lb.detach(), b)[1],
                               response_grid_logps_entropy(la.detach(), a)[1], atol=1e-5, rtol=1e-5)
    ga, gb = grads(model, pa, mask), grads(model, response_grid_logps(shared_prefix_logits(model, b), b), mask)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-4, rtol=1e-4, msg=name)


def test_nothing_to_share_falls_back():
    rows = samples()
    distinct = [rows[0], rows[4], rows[8]]  # one sample of each prompt
    assert shared_batch(distinct, 0) is None
    one_token = [Sample([9], [1, 2], [0.0, 0.0], True), Sample([9], [3], [0.0], True)]
    assert shared_batch(one_token, 0) is None  # nothing before the last prompt token to share


@pytest.mark.parametrize("kl", [False, True])
def test_a_grpo_update_with_shared_prompts_matches_the_plain_one(kl):
    """The roles as PPO runs them: the same old log-probs from the policy and the reference, then the same
    one-step update (loss, entropy, grad norm, and the weights it leaves), with the switch on and off."""
    from unipipe_ray.ppo import roles

    path, rows, out = str(tiny_model_dir()), samples(), {}
    for share in (False, True):
        torch.manual_seed(0)
        policy = roles.PolicyTrainer(path, lr=1e-3, pad_id=0, temperature=0.7, clip_eps=0.2, share_prompts=share)
        reference = roles.ReferenceModel(path, pad_id=0, temperature=0.7, share_prompts=share)
        ref = reference.logps(rows)
        advantages = torch.linspace(-1, 1, len(rows)).unsqueeze(1).expand_as(ref).contiguous()
        metrics = policy.update(rows, None, advantages, epochs=1, minibatch_size=len(rows), iteration=0,
                                ref_logps=ref if kl else None, kl_coef=0.1, kl_estimator="k3")
        out[share] = (policy.logps(rows), ref, metrics)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)  # reference
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=1e-4)  # the updated policy
    assert not torch.allclose(out[False][0], out[False][1], atol=1e-3)  # and the update did move it
    for key, value in out[False][2].items():
        assert out[True][2][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_under_deepspeed_zero3_the_shared_update_matches_the_plain_one():
    """ZeRO-3 gathers a partitioned layer's weights in hooks on the submodules: the prefix forward runs on the
    module under DeepSpeed's engine, and the update must still equal the plain path's (one process, gloo-free)."""
    from unipipe_ray.ppo import roles

    rows, out = samples(), {}
    for share in (False, True):
        torch.manual_seed(0)
        policy = roles.PolicyTrainer(str(tiny_model_dir()), lr=1e-3, pad_id=0, temperature=1.0, clip_eps=0.2,
                                     backend="deepspeed", zero_stage=3, share_prompts=share)
        old = policy.logps(rows)
        advantages = torch.linspace(-1, 1, len(rows)).unsqueeze(1).expand_as(old).contiguous()
        metrics = policy.update(rows, None, advantages, epochs=1, minibatch_size=len(rows), iteration=0)
        out[share] = (policy.logps(rows), metrics["ppo/grad_norm"])
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=1e-4)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-4)
