"""Run the chain: per stage skip (done, same config), resume (interrupted, same config) or run (new, or its
config or an input stage changed: then every later stage runs again too), recording it in the manifest.
run_dir is a local path or a URI (s3://, gs://, file://): there the stages keep their checkpoints at the URI
and rundir.py keeps a local staging copy of the driver's files in step with it.

    unipipe run --config FILE [--address ADDR] [key.sub=value ...]
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from unipipe_ray.config import PipelineConfig, result_differences, to_dict
from unipipe_ray.core import storage
from unipipe_ray.data.fingerprint import data_changes, fingerprint
from unipipe_ray.pipeline.chain import stage_config
from unipipe_ray.pipeline.manifest import Manifest
from unipipe_ray.pipeline.registry import REGISTRY
from unipipe_ray.pipeline.rundir import RunDir
from unipipe_ray.ppo import state as ppo_state
from unipipe_ray.runtime import tracking
from unipipe_ray.runtime.files import run_lock
from unipipe_ray.runtime.logs import progress

log = logging.getLogger(__name__)


def plan(manifest: Manifest, stage: str, config: dict, inputs_ran: bool,
         where: str | None = None, data_files: dict | None = None) -> tuple[str, str]:
    """(action, why) for one stage: action is skip, resume or run. ``where``: the stage's checkpoint storage
    (a URI) when it has one; ``data_files``: what its data config reads now (data/fingerprint.py), against
    what it read when it started (an entry from before this was recorded has none to compare)."""
    entry = manifest.stage(stage)
    if entry is None:
        return "run", "first run"
    if inputs_ran:
        return "run", "an earlier stage ran again, so its input changed"
    changed = [key for key, _, _ in result_differences(entry["config"], config)]
    if changed:
        return "run", f"config changed ({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''})"
    data = data_changes(entry["data_files"], data_files) if "data_files" in entry and data_files is not None else []
    if data:
        return "run", f"its data changed ({', '.join(data[:3])}{', ...' if len(data) > 3 else ''})"
    if entry["status"] == "done":
        if not _exists(entry["checkpoint"]):
            return "run", f"done earlier, but its checkpoint {entry['checkpoint']} is gone"
        return "skip", f"done earlier (checkpoint {entry['checkpoint']})"
    saved = last_checkpoint(stage, Path(entry["config"]["output_dir"]), where)
    return "resume", f"stopped earlier ({entry['status']}): " + (
        f"resuming from its last checkpoint ({saved})" if saved else "no checkpoint was saved, so it starts over")


def _exists(path: str) -> bool:
    return storage.exists(path) if storage.is_uri(path) else Path(path).exists()


def last_checkpoint(stage: str, output_dir: Path, where: str | None = None) -> str | None:
    """What a resumed stage will start from, in words: PPO's iteration, or the latest Ray Train checkpoint
    (in ``output_dir``, or in ``where`` when the stage keeps its checkpoints in cluster storage)."""
    import json

    if stage == "ppo":
        if where:
            found = ppo_state.find(storage.join(where, "checkpoint"))
            return f"iteration {ppo_state.load_controller(found)['iteration']}" if found else None
        for candidate in ("checkpoint", "checkpoint.old"):
            controller = output_dir / candidate / "controller.json"
            if controller.is_file():
                return f"iteration {json.loads(controller.read_text())['iteration']}"
        return None
    # Ray Train names checkpoints by time; our state file in each says its step
    if where:
        runs = storage.join(where, stage)
        states = [storage.join(runs, name, "trainer_state.pt") for name in storage.children(runs)
                  if name.startswith("checkpoint_")]
    else:
        states = [str(p / "trainer_state.pt") for p in (output_dir / stage).glob("checkpoint_*")]
    steps = [state["step"] for state in map(_trainer_state, states) if state]
    return f"step {max(steps)}" if steps else None


def _trainer_state(path: str) -> dict | None:
    """A checkpoint's trainer_state.pt (loaded as weights_only), None when it has none."""
    import io

    import torch

    if storage.is_uri(path):
        fs, inner = storage.open_uri(path)
        try:
            with fs.open_input_file(inner) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return torch.load(io.BytesIO(data), weights_only=True)
    return torch.load(path, weights_only=True) if Path(path).is_file() else None


def run_pipeline(cfg: PipelineConfig, given: set[str], address: str | None = None,
                 inject: dict | None = None) -> dict:
    """Run ``cfg.stages`` in order under ``cfg.run_dir``; then the report. ``given``: the keys the user set
    (config.load_config_with_keys). ``inject`` (tests): {stage: kwargs for its run function}, e.g. a stop in PPO.

    A URI run_dir (s3://...) is checked here, before any training, and the run works in its local staging
    copy of the driver's files, pulled first and pushed as stages end, while the stages write their checkpoints
    to the URI (rundir.py). The run holds ``<run_dir>/.lock`` throughout: a
    second driver on the same run_dir stops with RunLocked, naming the first, and touches nothing."""
    run_dir = RunDir(cfg.run_dir)
    with run_lock(run_dir.local, "pipeline run"):
        # --mlflow: one run for the chain, named after run_dir, with each stage's run inside (registry.py)
        name = Path(str(cfg.run_dir).rstrip("/")).name or "pipeline"
        with tracking.tracked_run(name, to_dict(cfg), {"unipipe.run_dir": cfg.run_dir,
                                                       "unipipe.stages": ",".join(cfg.stages)}):
            out = _run_chain(cfg, run_dir, given, address, inject)
            local = run_dir.local
            tracking.log_artifacts(local / "manifest.json", local / "report.md", local / "report.json",
                                   local / "plots")
            return out


def _run_chain(cfg: PipelineConfig, run_dir: RunDir, given: set[str], address: str | None, inject) -> dict:
    if run_dir.uri:
        progress(f"pipeline: run_dir {run_dir.uri}: working in the staging copy {run_dir.local}")
    run_dir.pull(cfg.stages)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir.local))  # the stages read and write local paths
    manifest = Manifest(run_dir.local)
    checkpoints: dict[str, str] = {}
    inputs_ran = False
    for i, stage in enumerate(cfg.stages):
        stage_cfg = stage_config(cfg, stage, checkpoints, given)
        config = to_dict(stage_cfg)
        files = fingerprint(stage_cfg.data)
        action, why = plan(manifest, stage, config, inputs_ran, run_dir.storage(stage), files)
        progress(f"pipeline: stage {i + 1}/{len(cfg.stages)} {stage}: {action} - {why}")
        if action == "skip":
            checkpoints[stage] = manifest.stage(stage)["checkpoint"]
            continue
        if action == "run":
            moved = run_dir.set_aside(stage)
            if moved:
                progress(f"pipeline: {stage}: its earlier outputs moved to {run_dir.shown(moved)}")
            manifest.forget_after(list(cfg.stages[i:]))
        checkpoints[stage] = _run_stage(stage, stage_cfg, config, manifest, run_dir, address, inject, files)
        inputs_ran = True
    # Local paths, or for a URI run_dir URIs in it (resolve_model downloads them); "uri" names that run_dir.
    out = {"run_dir": str(run_dir.local), "checkpoints": checkpoints, "manifest": str(manifest.path)}
    if run_dir.uri:
        out["uri"] = run_dir.uri
    if cfg.report:
        from unipipe_ray.pipeline.report import write_report

        if address is None:
            import ray

            ray.shutdown()  # the local cluster is done; generation gets the cores (it ran ~10x slower beside it)
        out["report"] = str(write_report(cfg, manifest))
        manifest.data["report"] = "report.md"
        manifest.save()
        run_dir.push("report.md", "report.json", "plots", "manifest.json")
    return out


def _run_stage(stage: str, stage_cfg, config: dict, manifest: Manifest, run_dir: RunDir, address: str | None,
               inject: dict | None, data_files: dict) -> str:
    """Run one stage, recording it in the manifest and pushing it to a URI run_dir; returns its checkpoint."""
    manifest.start(stage, config, data_files)
    run_dir.push("manifest.json")
    try:
        where = {"storage": run_dir.storage(stage)} if run_dir.spec else {}
        result = REGISTRY[stage].run(stage_cfg, address, **where, **(inject or {}).get(stage, {}))
    except BaseException as e:
        manifest.fail(stage, e)
        log.error("%s failed (%s: %s); run the same command again to resume it", stage, type(e).__name__, e)
        try:
            run_dir.push(stage, "manifest.json")  # its driver files, so that another machine can resume it
        except Exception as push_error:  # the stage's own error is the one to raise; the staging copy keeps all
            log.warning("pushing %s to %s failed too (%s); the next run pushes it", stage, run_dir.uri, push_error)
        raise
    manifest.finish(stage, result)
    run_dir.push(stage, "manifest.json")
    return str(result["checkpoint"])
