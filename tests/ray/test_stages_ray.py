"""RM and DPO stages on a local Ray cluster, and the exactness properties of all stage loops:
gradient accumulation 4 x 2 == 1 x 8, and a worker killed mid-run resumes to the same final weights.
Tiny random-init Llama with SmolLM2's real tokenizer; the built-in arith task."""

import math

import pytest
import torch
from ray.train import TrainingFailedError
from safetensors.torch import load_file

from tests.floors import assert_identical, assert_same_update
from unipipe_ray.config import DPOConfig, RMConfig, SFTConfig, load_config
from unipipe_ray.stages.dpo import run_dpo
from unipipe_ray.stages.reward import run_rm
from unipipe_ray.stages.sft import run_sft

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

DATA = ["model=tiny", "data.task_size=120", "data.eval_size=8", "data.max_length=96"]


def weights(checkpoint: str) -> dict:
    return load_file(f"{checkpoint}/model.safetensors")


def initial_weights() -> dict:
    from unipipe_ray.core.models import tiny_model_dir

    return load_file(f"{tiny_model_dir()}/model.safetensors")


def assert_same_training(a: dict, b: dict):
    """The same update up to gradient summation order (another split into ranks / micro-batches / buckets):
    compared over the whole update, with the tolerance and its measured floor in tests/floors.py."""
    assert_same_update(a, b, initial_weights())


def tensorboard_scalars(directory) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_dpo_starts_at_ln2_and_improves(ray_cluster, tmp_path):
    cfg = load_config(DPOConfig, overrides=DATA + [
        f"output_dir={tmp_path}", "train.batch_size=4", "train.max_steps=6", "train.lr=2e-3",
        "train.warmup_ratio=0", "precompute_ref_logps=true", "train.log_every=1"])
    result = run_dpo(cfg)
    curves = tensorboard_scalars(tmp_path / "tensorboard")
    # policy == reference before the first step: every pair's loss is -log sigmoid(0) = ln 2
    assert curves["dpo/eval_loss"][0] == pytest.approx((0, math.log(2)), abs=1e-6)
    assert curves["dpo/loss"][0] == pytest.approx((1, math.log(2)), abs=1e-6)
    assert [step for step, _ in curves["dpo/loss"]] == [1, 2, 3, 4, 5, 6]
    m = result["metrics"]
    assert m["step"] == 6
    # Final held-out margin is positive once the policy has moved away from the reference.
    assert m["dpo/eval_rewards_margin"] > 0 and m["dpo/eval_loss"] < math.log(2)
    assert result["eval_examples"] == 8


def test_rm_learns_a_clear_preference(ray_cluster, tmp_path):
    """User data (JSONL) where the chosen answer is always "yes ..." and the rejected "no ...": a signal a
    tiny random model can learn in a few steps, so held-out accuracy must reach 1."""
    import json

    rows = [{"prompt": f"Question {i}: is {i} a number?", "chosen": f"yes, {i} is a number.",
             "rejected": f"no, {i} is not a number."} for i in range(120)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(RMConfig, overrides=DATA + [
        f"output_dir={tmp_path / 'run'}", f"data.sources=[{{path: {data}}}]", "train.batch_size=8",
        "train.max_steps=10", "train.lr=1e-2", "train.warmup_ratio=0"])
    result = run_rm(cfg)
    m = result["metrics"]
    assert m["rm/eval_accuracy"] == 1.0 and m["rm/eval_loss"] < math.log(2) - 0.1  # from ln 2 at the start
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(result["checkpoint"])
    assert model.config.num_labels == 1


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    """1 worker, batch 8, no accumulation, 3 steps, padded batches: the reference run."""
    out = tmp_path_factory.mktemp("ref")
    cfg = load_config(SFTConfig, overrides=DATA + [f"output_dir={out}", "train.batch_size=8", "train.max_steps=3",
                                                   "train.lr=3e-3", "train.warmup_ratio=0", "train.packing=false"])
    return weights(run_sft(cfg)["checkpoint"])


# Packed (every forward, even where packing: auto would not bother): the resume tests below run packed too.
TWO_WORKERS = ["train.num_workers=2", "train.batch_size=2", "train.grad_accum=2", "train.max_steps=3", "train.lr=3e-3",
               "train.warmup_ratio=0", "train.checkpoint_every=1", "train.packing=true"]


@pytest.fixture(scope="module")
def uninterrupted_two_workers(ray_cluster, tmp_path_factory):
    """2 workers x batch 2 x accumulation 2 (8 a step), packed, 3 steps, a checkpoint after every step: the
    layout of the killed-worker runs, uninterrupted."""
    out = tmp_path_factory.mktemp("ref2")
    return weights(run_sft(load_config(SFTConfig, overrides=DATA + [f"output_dir={out}"] + TWO_WORKERS))["checkpoint"])


def test_grad_accumulation_4x2_equals_1x8(uninterrupted, tmp_path):
    cfg = load_config(SFTConfig, overrides=DATA + [f"output_dir={tmp_path}", "train.batch_size=2",
                                                   "train.grad_accum=4", "train.max_steps=3", "train.lr=3e-3",
                                                   "train.warmup_ratio=0"])
    assert_same_training(weights(run_sft(cfg)["checkpoint"]), uninterrupted)


def test_packed_two_workers_with_accumulation_equal_padded_one_worker(uninterrupted_two_workers, uninterrupted):
    """2 ranks x 2 micro-batches of 2, every forward packed without padding == one padded batch of 8: same
    losses, gradients and global normalisation, up to summation order."""
    assert_same_training(uninterrupted_two_workers, uninterrupted)


def test_padded_two_workers_with_accumulation_equal_one_worker(uninterrupted, tmp_path):
    """The same split on padded batches: the step's loss is normalised globally."""
    cfg = load_config(SFTConfig, overrides=DATA + [f"output_dir={tmp_path}"] + TWO_WORKERS + ["train.packing=false"])
    assert_same_training(weights(run_sft(cfg)["checkpoint"]), uninterrupted)


def test_packed_dpo_with_accumulation_equals_padded_dpo(ray_cluster, tmp_path):
    """DPO with train.packing, the reference run live (packed too), 2 micro-batches of 2 pairs, ends on the
    padded run's weights with one batch of 4: per-pair sums come from the packed forward, normalised alike."""
    common = DATA + ["train.max_steps=2", "train.lr=1e-3", "train.warmup_ratio=0", "data.eval_size=2"]
    packed = run_dpo(load_config(DPOConfig, overrides=common + [
        f"output_dir={tmp_path / 'packed'}", "train.packing=true", "train.batch_size=2", "train.grad_accum=2"]))
    padded = run_dpo(load_config(DPOConfig, overrides=common + [f"output_dir={tmp_path / 'padded'}",
                                                                "train.batch_size=4"]))
    assert packed["metrics"]["dpo/loss"] == pytest.approx(padded["metrics"]["dpo/loss"], abs=1e-5)
    assert_same_training(weights(packed["checkpoint"]), weights(padded["checkpoint"]))


def test_killed_worker_resumes_to_the_same_weights(uninterrupted_two_workers, tmp_path):
    """Rank 1 of 2 dies hard in step 2, after step 1's checkpoint; Ray Train restarts the group from it. The
    resumed run recomputes exactly what the uninterrupted one did (same layout, packed): bit for bit."""
    cfg = load_config(SFTConfig, overrides=DATA + [f"output_dir={tmp_path}"] + TWO_WORKERS)
    result = run_sft(cfg, inject_failure_at=1)
    assert (tmp_path / ".sft_failure_injected").exists(), "the failure really happened"
    assert result["metrics"]["resumed_at_step"] == 1
    assert_identical(weights(result["checkpoint"]), uninterrupted_two_workers)


def test_a_worker_killed_inside_a_checkpoint_report_resumes_to_the_same_weights(uninterrupted_two_workers, tmp_path):
    """Rank 1 of 2 dies while it writes and reports step 2's checkpoint (a timer, 0.2 s into the save, no
    pause to let the report finish). Whether that checkpoint was registered or lost, the restarted group
    resumes from a complete one and ends on the uninterrupted run's weights, bit for bit."""
    cfg = load_config(SFTConfig, overrides=DATA + [f"output_dir={tmp_path}"] + TWO_WORKERS)
    result = run_sft(cfg, inject_report_death_at=2)
    assert (tmp_path / ".sft_report_death_injected").exists(), "the failure really happened"
    assert result["metrics"]["resumed_at_step"] in (1, 2)
    assert_identical(weights(result["checkpoint"]), uninterrupted_two_workers)


@pytest.mark.parametrize("layout", [[], ["train.num_workers=2", "train.backend=deepspeed", "train.zero_stage=3"]],
                         ids=["ddp", "zero3"])
def test_lora_sft_saves_a_merged_model_and_the_adapter(ray_cluster, tmp_path, layout):
    """Under ZeRO-3 each rank holds only partitions: the merged model and the adapter must come from the
    gathered weights (they were once saved from the partitioned module)."""
    cfg = load_config(SFTConfig, overrides=DATA + layout + [
        f"output_dir={tmp_path}", "train.batch_size=4", "train.max_steps=2", "train.lr=1e-2",
        "train.lora.enabled=true", "train.lora.r=4"])
    checkpoint = run_sft(cfg)["checkpoint"]
    from transformers import AutoModelForCausalLM

    from unipipe_ray.core.models import tiny_model_dir

    merged = AutoModelForCausalLM.from_pretrained(checkpoint)  # plain transformers, adapters folded in
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    changed = {n for (n, a), (_, b) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(a, b)}
    # LoRA targets q/k/v/o: exactly those projections move, the frozen rest does not
    assert changed and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in changed)
    adapter = load_file(f"{checkpoint}/lora_adapter/adapter_model.safetensors")
    a = next(v for k, v in adapter.items() if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    b = next(v for k, v in adapter.items() if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
    assert a.shape[0] == 4 and b.shape[1] == 4 and b.abs().sum() > 0  # full (not partitioned), trained
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged.state_dict()[q], base.state_dict()[q] + (b @ a) * (cfg.train.lora.alpha / 4))


@pytest.mark.parametrize("packing", ["false", "true"])
def test_deepspeed_zero2_stage_matches_plain_data_parallel(uninterrupted, tmp_path, packing):
    """The same SFT loop on DeepSpeed ZeRO-2 over gloo (2 CPU workers), padded or packed, ends at the padded
    reference weights, up to the order in which DeepSpeed reduces gradients in its buckets."""
    cfg = load_config(SFTConfig, overrides=DATA + [f"output_dir={tmp_path}", "train.num_workers=2",
                                                   "train.batch_size=4", "train.max_steps=3", "train.lr=3e-3",
                                                   "train.warmup_ratio=0", "train.backend=deepspeed",
                                                   "train.zero_stage=2", f"train.packing={packing}"])
    assert_same_training(weights(run_sft(cfg)["checkpoint"]), uninterrupted)


@pytest.mark.parametrize("scheduler, keep_ratio, batch", [("sams", 0.5, 4), ("random", 0.25, 2)])
def test_dpo_with_a_pair_scheduler_survives_a_worker_failure(ray_cluster, tmp_path, scheduler, keep_ratio, batch):
    """2 workers; rank 1 dies in step 3, after step 2's checkpoint, so the resumed run reloads the scheduler (SamS nets,
    pool, pending round; the random generator) from the checkpoint. Random keeps 1 of 4 pairs: one rank
    always has none, and must still take part in the step (zero-weighted pass, same metric all-reduces).
    The resumed run ends on the uninterrupted run's weights, bit for bit (same layout)."""
    overrides = DATA + ["train.num_workers=2", f"train.batch_size={batch}", "train.max_steps=4", "train.lr=1e-3",
                        "train.checkpoint_every=2", f"scheduler={scheduler}", f"keep_ratio={keep_ratio}",
                        "sams.depth=2", "sams.width=64"]
    cfg = load_config(DPOConfig, overrides=overrides + [f"output_dir={tmp_path / 'killed'}"])
    result = run_dpo(cfg, inject_failure_at=2)
    assert (tmp_path / "killed" / ".dpo_failure_injected").exists()
    m = result["metrics"]
    assert m["step"] == 4 and math.isfinite(m["dpo/loss"]) and m["resumed_at_step"] == 2
    if scheduler == "sams":
        assert m["sams/pool_batches"] == 3  # rounds 1-3 finished and pooled, across the restart
    reference = run_dpo(load_config(DPOConfig, overrides=overrides + [f"output_dir={tmp_path / 'whole'}"]))
    assert reference["metrics"]["resumed_at_step"] == 0
    assert_identical(weights(result["checkpoint"]), weights(reference["checkpoint"]))


def test_a_restarted_job_resumes_to_the_same_weights(uninterrupted, tmp_path):
    """No restarts allowed: the worker failure in step 3 (after step 2's checkpoint) fails the run. Running the same
    command again (same config, same output_dir) resumes from that checkpoint and ends where the
    uninterrupted run did."""
    overrides = DATA + [f"output_dir={tmp_path}", "train.batch_size=8", "train.max_steps=3", "train.lr=3e-3",
                        "train.warmup_ratio=0", "train.checkpoint_every=1", "train.max_failures=0"]
    cfg = load_config(SFTConfig, overrides=overrides)
    with pytest.raises(TrainingFailedError, match="max_failures=0|[Ff]ail"):  # the dead worker, no restart left
        run_sft(cfg, inject_failure_at=2)
    assert (tmp_path / ".sft_failure_injected").exists()
    result = run_sft(load_config(SFTConfig, overrides=overrides))
    assert result["metrics"]["resumed_at_step"] == 2  # continued, not started over
    assert_identical(weights(result["checkpoint"]), uninterrupted)  # same layout: bit for bit
