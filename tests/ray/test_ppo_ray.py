"""PPO on a local Ray cluster with tiny random Llamas (SmolLM2's tokenizer): the reward rises on a
learnable rule reward with each rollout engine; the reward model serves from its own actor group; a
killed rollout actor is restarted, gets the current weights and the run goes on."""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.floors import LOGP_ATOL
from unipipe_ray.config import PPOConfig, load_config
from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.ppo.controller import run_ppo

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

BASE = ["data.task_size=100", "data.eval_size=4", "max_new_tokens=8", "prompts_per_iter=8", "samples_per_prompt=4",
        "minibatch_size=16"]


def history(tmp_path) -> list[dict]:
    return json.loads((tmp_path / "history.json").read_text())


@pytest.mark.parametrize("engine, colocate, sync", [("hf", True, "object_store"), ("vllm", False, "collective")])
def test_mean_reward_rises_on_a_learnable_rule(ray_cluster, tmp_path, engine, colocate, sync):
    """Rule: share of response tokens with id < 10000 (~0.2 for the random policy). The untied head lets
    the policy move that mass quickly: in the runs behind this test it passed 0.8 within 8 iterations.
    vLLM takes its weights over the collective weight group (weight_sync.py; the TCP store on CPU)."""
    cfg = load_config(PPOConfig, overrides=BASE + [
        f"model={tiny_model_dir(tie_word_embeddings=False)}", f"output_dir={tmp_path}", f"engine={engine}",
        f"colocate={colocate}", f"weight_sync={sync}", "sync_check_every=3",
        "estimator=grpo", "iterations=8", "ppo_epochs=4", "train.lr=3e-2", "kl_coef=0",
        "rule_reward=tests.ray.rules:low_id_share"])
    result = run_ppo(cfg)
    rule = [h["ppo/rule_mean"] for h in history(tmp_path)]
    assert len(rule) == 8
    assert sum(rule[-2:]) / 2 > sum(rule[:2]) / 2 + 0.25, rule
    # every iteration's rollouts were sampled with the trainer's weights (the free check), and after every
    # third sync the engine scores a batch like the trainer does (the full check)
    rows = history(tmp_path)
    assert all(h["ppo/rollout_logp_max_diff"] < LOGP_ATOL for h in rows)
    assert [h["iteration"] for h in rows if "ppo/engine_trainer_logp_max_diff" in h] == [1, 4, 7]
    assert all(h["ppo/engine_trainer_logp_max_diff"] < LOGP_ATOL for h in rows if h["iteration"] in (1, 4, 7))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result["checkpoint"])  # the final policy is a plain HF checkpoint


def test_reward_model_group_critic_and_a_killed_rollout_actor(ray_cluster, tmp_path):
    """GAE with a critic initialised from the reward model; the RM (a random-head classifier over the tiny
    Llama) scores in 2 actors of its own; the rollout actor is killed before iteration 2."""
    tiny = str(tiny_model_dir())
    cfg = load_config(PPOConfig, overrides=BASE + [
        f"model={tiny}", f"reward_model={tiny}", f"output_dir={tmp_path}", "estimator=gae", "iterations=3",
        "num_reward_workers=2", "train.lr=1e-3", "critic_lr=1e-3", "ppo_epochs=1"])
    run_ppo(cfg, inject_engine_failure_at=1)
    rows = history(tmp_path)
    assert [h["iteration"] for h in rows] == [1, 2, 3]  # the run went on after the kill
    assert all(h["ppo/reward_std"] > 0 for h in rows)  # real, varying reward-model scores
    assert all(h["ppo/value_loss"] >= 0 for h in rows)
    assert rows[1]["ppo/rollout_logp_max_diff"] < LOGP_ATOL  # the restarted engine sampled with the current weights
    # The iteration right after the restart equals an uninterrupted run's (same config, stopped after it):
    # a restart path that skipped the re-sync would sample from the initial weights and differ here.
    reference = tmp_path / "uninterrupted"
    with pytest.raises(RuntimeError, match="injected stop"):
        run_ppo(dataclasses.replace(cfg, output_dir=str(reference)), inject_stop_at=2)
    expected = history(reference)
    for key in ("ppo/proxy_mean", "ppo/reward_std", "ppo/response_length", "ppo/policy_loss", "ppo/value_loss",
                "ppo/kl"):
        assert rows[1][key] == pytest.approx(expected[1][key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("share_prompts, workers", [(False, 1), (True, 2)])
def test_one_step_grpo_with_the_kl_in_the_loss(ray_cluster, tmp_path, share_prompts, workers):
    """One optimizer step per iteration (one epoch, all 32 rollouts in one minibatch): no old-log-prob forward;
    the KL to the reference is in the loss. The rollouts' log-probs match the trainer's every iteration (the
    object-store sync hands the engines the trainer's state without a stop at the driver), the full check
    runs after syncs 1 and 3, and the KL grows from 0 once the policy moves. With share_prompts the trainer's
    and the reference's forwards take each prompt once (two DDP trainers: the prefix forward runs on the
    module under the wrapper), and the engine's log-probs still match them."""
    cfg = load_config(PPOConfig, overrides=BASE + [
        f"model={tiny_model_dir(tie_word_embeddings=False)}", f"output_dir={tmp_path}", "estimator=grpo",
        "iterations=3", "ppo_epochs=1", "minibatch_size=32", "kl_in=loss", "kl_estimator=k3", "kl_coef=0.1",
        "train.lr=1e-2", "sync_check_every=2", "rule_reward=tests.ray.rules:low_id_share",
        f"share_prompts={share_prompts}", f"train.num_workers={workers}"])
    run_ppo(cfg)
    rows = history(tmp_path)
    assert all(h["ppo/rollout_logp_max_diff"] < LOGP_ATOL for h in rows)
    assert [h["iteration"] for h in rows if "ppo/engine_trainer_logp_max_diff" in h] == [1, 3]
    assert rows[2]["ppo/engine_trainer_logp_max_diff"] < LOGP_ATOL
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6) and rows[2]["ppo/kl"] > 1e-4  # KL measured in the update


LEARNABLE = ["estimator=grpo", "ppo_epochs=4", "train.lr=3e-2", "kl_coef=0", "rule_reward=tests.ray.rules:low_id_share"]


def test_hacking_watch_fires_when_the_proxy_is_gamed_and_keeps_the_best_gold_policy(ray_cluster, tmp_path):
    """Proxy = the learnable rule; gold = its complement. As the policy games the proxy the gold falls: the
    watch must fire, stop the run (stop_on_hacking) and leave the best-gold policy on disk."""
    cfg = load_config(PPOConfig, overrides=BASE + LEARNABLE + [
        f"model={tiny_model_dir(tie_word_embeddings=False)}", f"output_dir={tmp_path}", "iterations=10",
        "gold_rule=tests.ray.rules:high_id_share", "stop_on_hacking=true"])
    result = run_ppo(cfg)
    rows = history(tmp_path)
    assert result["stopped_on_hacking"] and len(rows) < 10, [h["watch/divergence"] for h in rows]
    assert rows[-1]["watch/hacking"] == 1.0 and rows[-1]["watch/divergence"] > 0
    assert rows[-1]["ppo/proxy_mean"] > rows[0]["ppo/proxy_mean"]
    assert rows[-1]["ppo/gold_mean"] < rows[0]["ppo/gold_mean"]
    best = max(h["ppo/gold_mean"] for h in rows)
    assert best > rows[-1]["ppo/gold_mean"]
    first_best = next(h["iteration"] for h in rows if h["ppo/gold_mean"] == best)
    assert result["best_gold_iteration"] == first_best
    import torch
    from transformers import AutoModelForCausalLM

    # best_gold is the policy that sampled the best batch, before that iteration's update: when that is the
    # first batch, it is the initial model itself
    kept = AutoModelForCausalLM.from_pretrained(result["best_gold_checkpoint"]).state_dict()
    init = AutoModelForCausalLM.from_pretrained(cfg.model).state_dict()
    final = AutoModelForCausalLM.from_pretrained(result["checkpoint"]).state_dict()
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert not same(kept, final)
    if first_best == 1:
        assert same(kept, init)
    else:
        assert not same(kept, init)


def test_stopped_run_resumes_from_its_checkpoint_and_an_agreeing_gold_keeps_the_watch_silent(ray_cluster, tmp_path):
    """Checkpoint every 2 iterations, stop after 3: the re-run starts at iteration 3 from the checkpoint's
    weights and optimizer state, and finishes. Gold = the proxy itself, so the watch never fires."""
    overrides = BASE + LEARNABLE + [f"model={tiny_model_dir(tie_word_embeddings=False)}", f"output_dir={tmp_path}",
                                    "iterations=6", "gold_rule=tests.ray.rules:low_id_share",
                                    "train.checkpoint_every=2"]
    cfg = load_config(PPOConfig, overrides=overrides)
    with pytest.raises(RuntimeError, match="injected stop"):
        run_ppo(cfg, inject_stop_at=3)
    stopped = history(tmp_path)
    assert len(stopped) == 3
    result = run_ppo(cfg)
    rows = history(tmp_path)
    assert result["resumed_at_iteration"] == 2
    assert [h["iteration"] for h in rows] == [1, 2, 3, 4, 5, 6]
    assert all(h["watch/hacking"] == 0.0 for h in rows)
    # Rollouts are seeded per iteration and the batch order is a pure function of it, so iteration 3 re-run
    # from the checkpoint (weights and optimizer after iteration 2) repeats the stopped run's iteration 3.
    for key in ("ppo/rule_mean", "ppo/response_length", "ppo/policy_loss", "ppo/approx_kl", "ppo/grad_norm"):
        assert rows[2][key] == stopped[2][key], key
    assert rows[-1]["ppo/rule_mean"] > rows[0]["ppo/rule_mean"]
    assert rows[2]["ppo/rollout_logp_max_diff"] < LOGP_ATOL  # engines started from the checkpoint too
    assert not (tmp_path / "checkpoint.new").exists() and (tmp_path / "checkpoint" / "controller.json").is_file()


def test_driver_killed_inside_a_checkpoint_save_resumes_from_the_last_complete_one(ray_cluster, tmp_path):
    """The PPO driver runs in a child process on this cluster and is SIGKILLed while it writes a checkpoint
    (checkpoint/ complete, checkpoint.new half written). The rerun resumes from the complete one and repeats
    the next iteration exactly as the killed run had computed it before the save."""
    overrides = BASE + LEARNABLE + [f"model={tiny_model_dir(tie_word_embeddings=False)}", f"output_dir={tmp_path}",
                                    "iterations=4", "train.checkpoint_every=1"]
    address = ray_cluster.get_runtime_context().gcs_address
    script = (f"import ray\nfrom unipipe_ray.config import PPOConfig, load_config\n"
              f"from unipipe_ray.ppo.controller import run_ppo\nray.init(address={address!r})\n"
              f"run_ppo(load_config(PPOConfig, overrides={overrides!r}))\n")
    free_before = ray_cluster.available_resources().get("CPU", 0)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    complete, partial = tmp_path / "checkpoint" / "controller.json", tmp_path / "checkpoint.new"
    deadline = time.time() + 300
    while not (complete.is_file() and partial.is_dir()):  # a later save is under way
        assert child.poll() is None and time.time() < deadline, "the child ended before a second save"
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert partial.is_dir() and not (partial / "controller.json").exists()  # killed inside the save
    before = history(tmp_path)
    done = json.loads(complete.read_text())["iteration"]
    assert len(before) == done + 1  # the killed run had finished the iteration it was saving
    while ray_cluster.available_resources().get("CPU", 0) < free_before - 1e-6:  # the dead driver's actors are gone
        assert time.time() < deadline, "the killed driver's actors still hold the cluster's CPUs"
        time.sleep(0.5)
    result = run_ppo(load_config(PPOConfig, overrides=overrides))
    rows = history(tmp_path)
    assert result["resumed_at_iteration"] == done and [h["iteration"] for h in rows] == [1, 2, 3, 4]
    for key in ("ppo/rule_mean", "ppo/response_length", "ppo/policy_loss", "ppo/approx_kl", "ppo/grad_norm"):
        assert rows[done][key] == before[done][key], key
    assert not partial.exists()


def test_a_dead_policy_trainer_and_a_dead_reward_actor_are_rebuilt_from_the_last_checkpoint(ray_cluster, tmp_path):
    """Two policy trainers (one process group) and a reward-model actor; policy rank 1 is killed before
    iteration 2 and the reward actor before iteration 3. Each death is seen at the next call (not after a
    collective's timeout), every group is rebuilt from the last checkpoint, and the finished run's
    iterations equal an uninterrupted run's. (Waiting for a collective's timeout, 30 min, would overrun the
    test's timeout.)"""
    tiny = str(tiny_model_dir())
    overrides = BASE + [f"model={tiny}", f"reward_model={tiny}", "estimator=grpo", "iterations=4",
                        "train.num_workers=2", "train.lr=1e-3", "ppo_epochs=1", "train.checkpoint_every=1",
                        "train.max_failures=2"]
    result = run_ppo(load_config(PPOConfig, overrides=overrides + [f"output_dir={tmp_path / 'killed'}"]),
                     inject_role_failures={1: ("policy", 1), 2: ("reward", 0)})
    assert result["restarts"] == 2 and result["resumed_at_iteration"] == 2
    rows = history(tmp_path / "killed")
    whole = run_ppo(load_config(PPOConfig, overrides=overrides + [f"output_dir={tmp_path / 'whole'}"]))
    assert whole["restarts"] == 0
    expected = history(tmp_path / "whole")
    assert [h["iteration"] for h in rows] == [h["iteration"] for h in expected] == [1, 2, 3, 4]
    for key in ("ppo/proxy_mean", "ppo/reward_std", "ppo/policy_loss", "ppo/approx_kl", "ppo/grad_norm"):
        assert [h[key] for h in rows] == pytest.approx([h[key] for h in expected], rel=1e-5, abs=1e-7), key
