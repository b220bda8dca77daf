"""Each stage's config with the chain filled in.

Defaults (a stage section that sets the key keeps its value):
    sft.model   = the pipeline's model
    rm.model    = the SFT model (else the pipeline's model)
    ppo.model   = the previous policy (SFT, else the pipeline's model); ppo.reward_model = the RM checkpoint
                  (the critic starts from it too, PPO's own default)
    dpo.model   = the previous policy (PPO, else SFT, else the pipeline's model); its reference = its input
    <stage>.output_dir = <run_dir>/<stage> (always: the manifest relies on it)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from unipipe_ray.config import STAGES, PipelineConfig, parse_override, read_yaml

POLICY_STAGES = ("sft", "ppo", "dpo")  # stages whose output is the next policy


def given_keys(path: str | None, overrides: list[str] = ()) -> set[str]:
    """Dotted keys the user set in the YAML file or on the command line (``dpo.model``, ``ppo.reward_model``)."""
    keys: set[str] = set()

    def walk(node, prefix):
        for k, v in node.items():
            dotted = f"{prefix}{k}"
            keys.add(dotted)
            if isinstance(v, dict):
                walk(v, dotted + ".")

    if path:
        walk(read_yaml(path), "")
    for text in overrides:
        key, value = parse_override(text)
        keys.add(key)
        if isinstance(value, dict):
            walk(value, key + ".")
    return keys


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
    return dataclasses.replace(section, **changes)
