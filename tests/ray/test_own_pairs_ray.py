"""PPO -> DPO on the policy's own samples, chained on the tiny model: DPO samples answers from PPO's final
policy, scores them (here with the learnable rule of the PPO tests, which a random-init model meets in part;
the task's checker is the default), trains on (best, worst) pairs and records them in its output directory.
Local Ray cluster, built-in arith task."""

import json

import pytest

from unipipe_ray.config import PipelineConfig, given_keys, load_config
from unipipe_ray.pipeline.run import run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

CONFIG = """
model: tiny
stages: [ppo, dpo]
report: false
eval_size: 4
ppo:
  data: &data {task: arith, task_size: 40, eval_size: 4, max_length: 96}
  estimator: grpo
  iterations: 2
  prompts_per_iter: 4
  samples_per_prompt: 2
  max_new_tokens: 8
  minibatch_size: 8
  rule_reward: tests.ray.rules:low_id_share
  train: {lr: 1.0e-3}
dpo:
  data: *data
  pairs: own
  own: {samples: 4, max_new_tokens: 8, rule: "tests.ray.rules:low_id_share", seed: 3}
  beta: 0.1
  train: {batch_size: 4, max_steps: 3, lr: 2.0e-3, log_every: 1}
"""


def test_ppo_then_dpo_on_the_policys_own_samples(ray_cluster, tmp_path, capsys):
    path = tmp_path / "chain.yaml"
    path.write_text(CONFIG)
    overrides = [f"run_dir={tmp_path / 'run'}"]
    out = run_pipeline(load_config(PipelineConfig, path, overrides), given_keys(str(path), overrides))
    dpo_dir = tmp_path / "run" / "dpo"
    saved = json.loads((dpo_dir / "own_pairs.json").read_text())
    result = json.loads((dpo_dir / "result.json").read_text())

    # sampled from PPO's final policy, the stage's input
    assert saved["key"]["model"] == out["checkpoints"]["ppo"] == result["config"]["model"]
    stats, train = saved["stats"], saved["train"]
    assert stats["train_prompts"] == 36 and stats["eval_prompts"] == 4  # 40 prompts, 4 held out
    assert stats["pairs"] == stats["train_pairs"] == len(train) > 0
    assert stats["train_pairs"] + stats["train_all_tied"] == 36
    for pair in train:  # the better answer of its prompt against the worse one
        assert pair["meta"]["chosen_score"] > pair["meta"]["rejected_score"]
        assert pair["chosen"] != pair["rejected"] and pair["source"] == "own:train"
    # trained on exactly those pairs, with the pair-building figures among its metrics
    assert result["train_examples"] == len(train) and result["eval_examples"] == len(saved["eval"])
    assert result["metrics"]["dpo/own_train_pairs"] == len(train)
    assert result["metrics"]["dpo/own_train_pair_share"] == pytest.approx(len(train) / 36)
    assert result["metrics"]["step"] == 3
    assert "dpo: train:" in capsys.readouterr().out  # the pair-building line the user sees

    # the same command again: DPO is done (skipped); a DPO rerun alone reuses the pairs, it does not resample
    from unipipe_ray.config import DPOConfig
    from unipipe_ray.pipeline.own_pairs import own_features

    again = load_config(DPOConfig, overrides=[f"{k}={v}" for k, v in [
        ("model", out["checkpoints"]["ppo"]), ("output_dir", dpo_dir), ("pairs", "own"), ("data.task", "arith"),
        ("data.task_size", 40), ("data.eval_size", 4), ("data.max_length", 96), ("own.samples", 4),
        ("own.max_new_tokens", 8), ("own.rule", "tests.ray.rules:low_id_share"), ("own.seed", 3)]])
    capsys.readouterr()
    train_feats, _, again_stats = own_features(again)
    assert "reusing the" in capsys.readouterr().out and again_stats == stats and len(train_feats) == len(train)


def test_unipipe_dpo_on_own_samples_of_user_prompts_scored_by_a_reward_model(ray_cluster, tmp_path):
    """No checker for the user's prompts: a reward model (here the tiny model with its seeded random head, as
    an untrained RM) scores the answers; the command runs sampling, pairing and training."""
    from unipipe_ray.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Name a color ({i})."}]}) + "\n"
                               for i in range(12)))
    out = tmp_path / "dpo"
    assert main(["dpo", "model=tiny", f"output_dir={out}", "pairs=own", "own.reward_model=tiny", "own.samples=3",
                 "own.max_new_tokens=6", "own.eval_prompts=1", f"data.sources=[{{path: {prompts}}}]",
                 "data.eval_size=3", "data.max_length=64", "train.batch_size=2", "train.max_steps=2"]) == 0
    saved = json.loads((out / "own_pairs.json").read_text())
    assert saved["key"]["own"]["reward_model"] == "tiny"
    # continuous scores: every prompt whose answers differ gives a pair, scored best over worst
    assert saved["stats"]["train_prompts"] == 9 and saved["stats"]["train_pairs"] >= 7
    assert saved["stats"]["eval_prompts"] == 1  # own.eval_prompts: 1 of the 3 held out is sampled
    assert all(p["meta"]["chosen_score"] > p["meta"]["rejected_score"] for p in saved["train"])
    result = json.loads((out / "result.json").read_text())
    assert result["train_examples"] == saved["stats"]["train_pairs"] and result["metrics"]["step"] == 2
    assert result["eval_examples"] == len(saved["eval"]) <= 1
