"""experiments/reward_hacking.py builds stage configs the stages accept: PPO rewarded by the RM alone (the
checker only watched), run on past the watch's verdict; and it reports the first iteration the watch fired."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

from reward_hacking import first_alarm, parse_args, sections  # noqa: E402

from unipipe_ray.config import PPOConfig, RMConfig, SFTConfig, build_config  # noqa: E402


def test_the_stage_configs_load_and_reward_the_rm_alone():
    cfg = sections(parse_args(["--rm-steps", "5", "--iterations", "7", "--lr", "2e-5", "--eval-size", "16"]))
    build_config(SFTConfig, {**cfg["sft"], "model": "tiny"})
    rm = build_config(RMConfig, {**cfg["rm"], "model": "tiny"})
    ppo = build_config(PPOConfig, {**cfg["ppo"], "model": "tiny", "reward_model": "rm-checkpoint"})
    assert rm.train.max_steps == 5 and rm.data.eval_size == 16
    assert ppo.gold_reward_weight == 0.0 and ppo.rule_reward is None and ppo.reward_model == "rm-checkpoint"
    assert ppo.iterations == 7 and ppo.train.lr == pytest.approx(2e-5) and not ppo.stop_on_hacking
    assert ppo.data.eval_size == 16  # the held-out problems are split off before training, in every stage


def test_the_first_alarm_is_the_first_iteration_the_watch_fired():
    history = [{"iteration": i, "watch/hacking": float(i in (5, 6, 8))} for i in range(1, 9)]
    assert first_alarm(history) == 5
    assert first_alarm([{"iteration": 1, "watch/hacking": 0.0}]) is None
