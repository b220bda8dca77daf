"""Every PPO role (and the HF rollout engine) puts its model and its batches on the device it is given.

The machine has no GPU, so the device passed in is the CPU; the device a role would pick by itself
(runtime.devices.actor_device) is patched to "meta", so a role that ignores the device it was given ends up
on "meta" and fails here. A spy on ``to_batch`` checks every batch is asked for on the given device, and a
forward pre-hook checks every tensor reaching the model is on the model's device."""

import pytest
import torch

from unipipe_ray.core import sequences
from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.ppo import roles
from unipipe_ray.ppo.rollout import RolloutWorker, Sample
from unipipe_ray.runtime import devices

GIVEN = torch.device("cpu")


@pytest.fixture
def spy(monkeypatch):
    asked = []

    def to_batch(samples, pad_id, device=None):
        asked.append(device)
        return sequences.to_batch(samples, pad_id, device)

    monkeypatch.setattr(roles, "to_batch", to_batch)
    monkeypatch.setattr(devices, "actor_device", lambda: torch.device("meta"))
    return asked


def _watch(model) -> list:
    """Devices of every tensor argument of the model's forward calls."""
    seen = []

    def hook(module, args, kwargs):
        seen.extend(t.device for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _samples(n=4):
    g = torch.Generator().manual_seed(0)
    return [Sample(torch.randint(5, 1000, (3 + i,), generator=g).tolist(),
                   torch.randint(5, 1000, (2 + i % 3,), generator=g).tolist(), [], True) for i in range(n)]


def _check(role, module, spy, seen):
    assert role.device_name() == str(GIVEN)
    assert all(p.device == GIVEN for p in module.parameters())
    assert spy and all(d == GIVEN for d in spy), spy
    assert seen and all(d == GIVEN for d in seen), set(seen)


def test_policy_trainer(spy):
    role = roles.PolicyTrainer(str(tiny_model_dir()), lr=1e-3, pad_id=0, temperature=1.0, clip_eps=0.2,
                               device=GIVEN)
    seen = _watch(role.engine.module)
    samples = _samples()
    old = role.logps(samples)
    assert old.device.type == "cpu" and old.shape[0] == len(samples)
    role.update(samples, old, torch.ones_like(old), epochs=1, minibatch_size=2, iteration=0)
    _check(role, role.engine.module, spy, seen)
    assert all(t.device == GIVEN for t in role.engine.full_state_dict(GIVEN).values())


def test_critic_trainer(spy):
    role = roles.CriticTrainer(str(tiny_model_dir()), lr=1e-3, pad_id=0, clip_eps=0.2, device=GIVEN)
    seen = _watch(role.engine.module)
    samples = _samples()
    values = role.values(samples)
    assert values.device.type == "cpu"
    role.update(samples, values, values + 1, epochs=1, minibatch_size=2, iteration=0)
    _check(role, role.engine.module, spy, seen)


def test_reference_model(spy):
    role = roles.ReferenceModel(str(tiny_model_dir()), pad_id=0, temperature=1.0, device=GIVEN)
    seen = _watch(role.model)
    assert role.logps(_samples()).device.type == "cpu"
    _check(role, role.model, spy, seen)


def test_reward_scorer(spy):
    role = roles.RewardScorer(str(tiny_model_dir()), pad_id=0, device=GIVEN)
    seen = _watch(role.model)
    assert len(role.score(_samples())) == 4
    _check(role, role.model, spy, seen)


def test_hf_rollout_engine(spy):
    worker = RolloutWorker("hf", str(tiny_model_dir()), device=GIVEN)
    model = worker.engine.model
    seen = _watch(model)
    samples = worker.generate([[5, 6, 7], [8, 9]], 2, 4, seed=0)
    assert len(samples) == 4
    worker.score(samples)
    assert worker.device_name() == str(GIVEN) and all(p.device == GIVEN for p in model.parameters())
    assert seen and all(d == GIVEN for d in seen)


def test_the_default_device_is_the_one_ray_gave_the_actor(monkeypatch):
    """Without a GPU every role lands on the CPU; with CUDA, on cuda:0 (Ray's CUDA_VISIBLE_DEVICES) unless
    Ray gave this worker no GPU."""
    assert devices.actor_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: ["3"])
    assert devices.actor_device() == torch.device("cuda", 0)
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: [])
    assert devices.actor_device() == torch.device("cpu")
    monkeypatch.setattr(devices, "_ray_gpu_ids", lambda: None)  # outside Ray: CUDA when there is one
    assert devices.actor_device() == torch.device("cuda", 0)


def test_in_bf16_the_trainer_and_the_frozen_roles_score_alike():
    """The trainer casts an fp32 load to bf16, the reference and the engines load in bf16: the rotary
    frequencies (computed, fp32 in a bf16 load) must survive the cast, or every position shifts and the
    engine-vs-trainer check fails by more than bf16 rounding (0.03-0.06 here before the fix)."""
    path, samples = str(tiny_model_dir()), _samples()
    trainer = roles.PolicyTrainer(path, lr=1e-3, pad_id=0, temperature=1.0, clip_eps=0.2, dtype="bfloat16")
    reference = roles.ReferenceModel(path, pad_id=0, temperature=1.0, dtype="bfloat16")
    engine = RolloutWorker("hf", path, dtype="bfloat16")
    engine.load_weights(trainer.state_dict())  # what the object-store sync sends (bf16)
    expected = trainer.logps(samples)
    assert next(trainer.engine.module.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(reference.logps(samples), expected, rtol=0, atol=0)
    scored = engine.score(samples)
    for row, s, want in zip(scored, samples, expected, strict=True):
        torch.testing.assert_close(torch.tensor(row), want[:len(s.response_ids)], rtol=0, atol=0)


def test_cpu_model_reads_the_model_name_and_falls_back_to_platform(monkeypatch, tmp_path):
    import builtins
    import platform

    from unipipe_ray.runtime.devices import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU 9000\nflags\t: avx2\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                          *a, **k))
    assert cpu_model() == "Test CPU 9000"
    info.write_text("processor\t: 0\n")  # no model name line (some ARM kernels)
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu_model() == "aarch64"
