"""The pipeline's per-stage decision and the chain's defaults, without running anything."""

import dataclasses

import pytest

from unipipe_ray.config import ConfigError, PipelineConfig, PPOConfig, given_keys, load_config, to_dict
from unipipe_ray.pipeline.chain import stage_config
from unipipe_ray.pipeline.manifest import Manifest
from unipipe_ray.pipeline.run import plan


def test_chain_defaults_and_what_the_user_set_wins(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: tiny\ndpo:\n  model: my/dpo-init\n")
    cfg = load_config(PipelineConfig, path, [f"run_dir={tmp_path}/run"])
    given = given_keys(str(path), ["ppo.reward_model=rm-x"])
    assert {"model", "dpo", "dpo.model", "ppo.reward_model"} <= given
    ckpt = {"sft": "S", "rm": "R", "ppo": "P"}
    assert stage_config(cfg, "sft", {}, given).model == "tiny"
    assert stage_config(cfg, "rm", ckpt, given).model == "S"
    ppo = stage_config(cfg, "ppo", ckpt, given)
    assert ppo.model == "S" and ppo.reward_model is None  # user set ppo.reward_model: not overwritten here
    assert stage_config(cfg, "dpo", ckpt, given).model == "my/dpo-init"
    no_user = set()
    assert stage_config(cfg, "dpo", ckpt, no_user).model == "P"
    assert stage_config(cfg, "dpo", {"sft": "S"}, no_user).model == "S"  # no PPO: the SFT policy
    assert stage_config(cfg, "ppo", ckpt, no_user).reward_model == "R"
    assert stage_config(cfg, "rm", {}, no_user).model == "tiny"
    assert stage_config(cfg, "sft", {}, no_user).output_dir == f"{tmp_path}/run/sft"


def test_plan_skip_resume_run(tmp_path):
    cfg = load_config(PipelineConfig, overrides=[f"run_dir={tmp_path}"])
    m = Manifest(tmp_path)
    conf = to_dict(stage_config(cfg, "sft", {}, set()))
    assert plan(m, "sft", conf, False) == ("run", "first run")
    m.start("sft", conf)
    assert plan(m, "sft", conf, False)[0] == "resume"
    (tmp_path / "ckpt").mkdir()
    m.finish("sft", {"checkpoint": str(tmp_path / "ckpt"), "metrics": {"a": 1.0, "skip": [1]}, "seconds": 3})
    assert Manifest(tmp_path).stage("sft")["metrics"] == {"a": 1.0}  # written to disk, plain values only
    assert plan(m, "sft", conf, False)[0] == "skip"
    assert plan(m, "sft", conf, True)[0] == "run"  # an earlier stage ran again
    changed = dict(conf, train=dict(conf["train"], lr=1.0))
    action, why = plan(m, "sft", changed, False)
    assert action == "run" and "train.lr" in why
    (tmp_path / "ckpt").rmdir()
    assert plan(m, "sft", conf, False) == ("run", f"done earlier, but its checkpoint {tmp_path / 'ckpt'} is gone")


def test_operational_keys_neither_rerun_a_done_stage_nor_block_a_resume(tmp_path):
    from unipipe_ray.runtime.launch import check_same_config

    cfg = load_config(PipelineConfig, overrides=[f"run_dir={tmp_path}"])
    m = Manifest(tmp_path)
    conf = to_dict(stage_config(cfg, "sft", {}, set()))
    m.start("sft", conf)
    (tmp_path / "ckpt").mkdir()
    m.finish("sft", {"checkpoint": str(tmp_path / "ckpt"), "metrics": {}, "seconds": 1})
    check_same_config(tmp_path / "sft_config.json", conf)
    ops = load_config(PipelineConfig, overrides=[f"run_dir={tmp_path}", "sft.train.max_failures=5",
                                                 "sft.train.log_every=7", "sft.train.eval_every=3",
                                                 "sft.train.checkpoint_every=2"])
    ops_conf = to_dict(stage_config(ops, "sft", {}, set()))
    assert plan(m, "sft", ops_conf, False)[0] == "skip"
    check_same_config(tmp_path / "sft_config.json", ops_conf)  # a resume with them is fine too
    lr = load_config(PipelineConfig, overrides=[f"run_dir={tmp_path}", "sft.train.lr=2e-5"])
    assert plan(m, "sft", to_dict(stage_config(lr, "sft", {}, set())), False) == \
        ("run", "config changed (train.lr)")
    # PPO's full engine-vs-trainer check is operational too (how often it runs); where the KL goes is not
    ppo = PPOConfig(output_dir=str(tmp_path / "ppo"))
    check_same_config(tmp_path / "ppo_config.json", to_dict(ppo))
    check_same_config(tmp_path / "ppo_config.json", to_dict(dataclasses.replace(ppo, sync_check_every=1)))
    with pytest.raises(ConfigError, match="kl_in"):
        check_same_config(tmp_path / "ppo_config.json", to_dict(dataclasses.replace(ppo, kl_in="loss")))


def test_the_resume_line_says_from_where_or_that_the_stage_starts_over(tmp_path):
    cfg = load_config(PipelineConfig, overrides=[f"run_dir={tmp_path}"])
    m = Manifest(tmp_path)
    for stage in ("sft", "ppo"):
        conf = to_dict(stage_config(cfg, stage, {}, set()))
        m.start(stage, conf)
        assert plan(m, stage, conf, False) == ("resume", "stopped earlier (running): no checkpoint was saved, so "
                                                         "it starts over")
    import torch

    for name, step in (("checkpoint_2026-12-05_07-03-38", 3), ("checkpoint_2026-12-05_07-03-37", 2)):
        (tmp_path / "sft" / "sft" / name).mkdir(parents=True)
        torch.save({"step": step}, tmp_path / "sft" / "sft" / name / "trainer_state.pt")
    (tmp_path / "sft" / "sft" / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp_path / "ppo" / "checkpoint").mkdir(parents=True)
    (tmp_path / "ppo" / "checkpoint" / "controller.json").write_text('{"iteration": 6}')
    sft, ppo = (to_dict(stage_config(cfg, s, {}, set())) for s in ("sft", "ppo"))
    assert plan(m, "sft", sft, False)[1].endswith("resuming from its last checkpoint (step 3)")
    assert plan(m, "ppo", ppo, False)[1].endswith("resuming from its last checkpoint (iteration 6)")
