"""The stages, written once: name, config class, one line of help and how to run it, in the chain's order.

``unipipe <stage>`` (cli.py) and the chained run (run.py) both read this table; ``config.STAGES`` is the
chain's order that PipelineConfig validates against, and the table must follow it. The runners import
their stage when called, so that the command line starts without torch or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unipipe_ray.config import STAGES, DPOConfig, PPOConfig, RMConfig, SFTConfig


def _run_sft(cfg, address=None, **hooks) -> dict:
    from unipipe_ray.stages.sft import run_sft
    return run_sft(cfg, address, **hooks)


def _run_rm(cfg, address=None, **hooks) -> dict:
    from unipipe_ray.stages.reward import run_rm
    return run_rm(cfg, address, **hooks)


def _run_ppo(cfg, address=None, **hooks) -> dict:
    from unipipe_ray.ppo.controller import run_ppo
    return run_ppo(cfg, address, **hooks)


def _run_dpo(cfg, address=None, **hooks) -> dict:
    from unipipe_ray.stages.dpo import run_dpo
    if cfg.pairs == "own":  # sampled from the stage's input policy first (own_pairs.py)
        from unipipe_ray.pipeline.own_pairs import own_features
        hooks["own"] = own_features(cfg, address)
    return run_dpo(cfg, address, **hooks)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type           # the stage's config class (also its section's type in PipelineConfig)
    summary: str           # one line for `unipipe --help`
    run: Callable          # run(cfg, address=None, **test hooks) -> result dict (metrics, checkpoint, ...)


def _tracked(stage: str, run: Callable) -> Callable:
    """``run`` in its own MLflow run when ``--mlflow`` is on (runtime/tracking.py): the config as parameters,
    the figures as the stage reports them, its config and result files as artifacts."""
    def tracked(cfg, address=None, **hooks) -> dict:
        from pathlib import Path

        from unipipe_ray.config import to_dict
        from unipipe_ray.runtime import tracking

        if not tracking.enabled():
            return run(cfg, address, **hooks)
        tags = {"unipipe.stage": stage, "unipipe.output_dir": cfg.output_dir, "unipipe.model": cfg.model}
        with tracking.tracked_run(tracking.run_name(stage, cfg.output_dir), to_dict(cfg), tags):
            try:
                return run(cfg, address, **hooks)
            finally:
                out = Path(cfg.output_dir)
                tracking.log_artifacts(out / f"{stage}_config.json", out / "result.json", out / "history.json")
    return tracked


REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", SFTConfig, "supervised fine-tuning", _tracked("sft", _run_sft)),
    Stage("rm", RMConfig, "reward model (Bradley-Terry)", _tracked("rm", _run_rm)),
    Stage("ppo", PPOConfig, "RLHF with PPO / GRPO / RLOO", _tracked("ppo", _run_ppo)),
    Stage("dpo", DPOConfig, "direct preference optimization", _tracked("dpo", _run_dpo)),
)}
assert tuple(REGISTRY) == STAGES, "the registry must list config.STAGES, in the chain's order"
