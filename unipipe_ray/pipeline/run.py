"""Run the chain: per stage skip (done, same config), resume (interrupted, same config) or run (new, or its
config or an input stage changed: then every later stage runs again too), recording it in the manifest.

    unipipe run --config FILE [--address ADDR] [key.sub=value ...]
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from unipipe_ray.config import PipelineConfig, to_dict
from unipipe_ray.pipeline.chain import stage_config
from unipipe_ray.pipeline.manifest import Manifest
from unipipe_ray.stages.common import config_differences


def _runner(stage: str):
    from unipipe_ray.stages.dpo import run_dpo
    from unipipe_ray.stages.ppo import run_ppo
    from unipipe_ray.stages.reward import run_rm
    from unipipe_ray.stages.sft import run_sft

    return {"sft": run_sft, "rm": run_rm, "ppo": run_ppo, "dpo": run_dpo}[stage]


def _move_aside(output_dir: Path, run_dir: Path) -> Path | None:
    """A stage's old outputs go to <run_dir>/replaced/ instead of being deleted (nothing lost silently)."""
    if not output_dir.exists():
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir / "replaced" / f"{output_dir.name}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(output_dir), target)
    return target


def plan(cfg: PipelineConfig, manifest: Manifest, stage: str, config: dict, inputs_ran: bool) -> tuple[str, str]:
    """(action, why) for one stage: action is skip, resume or run."""
    entry = manifest.stage(stage)
    if entry is None:
        return "run", "first run"
    if inputs_ran:
        return "run", "an earlier stage ran again, so its input changed"
    changed = [key for key, _, _ in config_differences(entry["config"], config)]
    if changed:
        return "run", f"config changed ({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''})"
    if entry["status"] == "done":
        if not Path(entry["checkpoint"]).exists():
            return "run", f"done earlier, but its checkpoint {entry['checkpoint']} is gone"
        return "skip", f"done earlier (checkpoint {entry['checkpoint']})"
    return "resume", f"stopped earlier ({entry['status']}): resuming from its last checkpoint"


def run_pipeline(cfg: PipelineConfig, given: set[str], address: str | None = None,
                 inject: dict | None = None) -> dict:
    """Run ``cfg.stages`` in order under ``cfg.run_dir``; then the report. ``given``: the keys the user set
    (chain.given_keys). ``inject`` (tests): {stage: kwargs for its run function}, e.g. a stop in PPO."""
    if "://" in cfg.run_dir:
        raise ValueError(f"run_dir {cfg.run_dir!r}: the stages write checkpoints to a local or shared POSIX path; "
                         "URIs (s3://, gs://) are not supported yet. Mount the bucket or use a shared filesystem.")
    run_dir = Path(cfg.run_dir).resolve()
    manifest = Manifest(run_dir)
    checkpoints: dict[str, str] = {}
    inputs_ran = False
    for i, stage in enumerate(cfg.stages):
        stage_cfg = stage_config(cfg, stage, checkpoints, given)
        config = to_dict(stage_cfg)
        action, why = plan(cfg, manifest, stage, config, inputs_ran)
        print(f"pipeline: stage {i + 1}/{len(cfg.stages)} {stage}: {action} - {why}", flush=True)
        if action == "skip":
            checkpoints[stage] = manifest.stage(stage)["checkpoint"]
            continue
        if action == "run":
            moved = _move_aside(Path(stage_cfg.output_dir).resolve(), run_dir)
            if moved:
                print(f"pipeline: {stage}: its earlier outputs moved to {moved}", flush=True)
            manifest.forget_after(list(cfg.stages[i:]))
        manifest.start(stage, config)
        try:
            result = _runner(stage)(stage_cfg, address, **(inject or {}).get(stage, {}))
        except BaseException as e:
            manifest.fail(stage, e)
            print(f"pipeline: {stage} failed ({type(e).__name__}: {e}); run the same command again to resume it",
                  flush=True)
            raise
        manifest.finish(stage, result)
        checkpoints[stage] = str(result["checkpoint"])
        inputs_ran = True
    out = {"run_dir": str(run_dir), "checkpoints": checkpoints, "manifest": str(manifest.path)}
    if cfg.report:
        from unipipe_ray.pipeline.report import write_report

        if address is None:
            import ray

            ray.shutdown()  # the local cluster is done; generation gets the cores (it ran ~10x slower beside it)
        out["report"] = str(write_report(cfg, manifest, given))
        manifest.data["report"] = "report.md"
        manifest.save()
    return out
