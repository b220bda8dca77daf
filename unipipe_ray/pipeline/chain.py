"""Each stage's config with the chain filled in.

Defaults (a stage section that sets the key keeps its value):
    sft.model   = the pipeline's model
    rm.model    = the SFT model (else the pipeline's model)
    ppo.model   = the previous policy (SFT, else the pipeline's model); ppo.reward_model = the RM checkpoint
                  (the critic starts from it too, PPO's own default)
    dpo.model   = the previous policy (PPO, else SFT, else the pipeline's model); its reference = its input;
                  with pairs: own and data without a checker, dpo.own.reward_model = the RM checkpoint
    <stage>.output_dir = <run_dir>/<stage> (always: the manifest relies on it)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from unipipe_ray.config import STAGES, PipelineConfig

POLICY_STAGES = ("sft", "ppo", "dpo")  # stages whose output is the next policy


def has_checker(data) -> bool:
    """Whether the data's answers can be checked (the built-in verifiable tasks; user sources cannot)."""
    return not data.sources and data.task in ("arith", "gsm8k")


def stage_config(cfg: PipelineConfig, stage: str, checkpoints: dict[str, str], given: set[str]):
    """The config ``stage`` runs with, given the checkpoints of the stages before it ({stage: path})."""
    section = getattr(cfg, stage)
    earlier = STAGES[:STAGES.index(stage)]
    previous_policy = next((checkpoints[s] for s in reversed(earlier) if s in POLICY_STAGES and s in checkpoints),
                           None)
    changes = {"output_dir": str(Path(cfg.run_dir) / stage)}
    if f"{stage}.model" not in given:
        changes["model"] = checkpoints.get("sft", cfg.model) if stage == "rm" else previous_policy or cfg.model
    if stage == "ppo" and "ppo.reward_model" not in given and "rm" in checkpoints:
        changes["reward_model"] = checkpoints["rm"]
    own = section.own if stage == "dpo" else None
    if (own and section.pairs == "own" and "rm" in checkpoints and own.rule is None
            and "dpo.own.reward_model" not in given and not has_checker(section.data)):
        changes["own"] = dataclasses.replace(own, reward_model=checkpoints["rm"])  # no checker: the RM scores
    return dataclasses.replace(section, **changes)
