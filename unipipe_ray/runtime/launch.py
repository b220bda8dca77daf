"""The stage launcher (driver side): load and check the data once, start Ray Train's TorchTrainer on the
workers, draw progress from their reports, write the result.

Plain functions, not a base class: a stage module is its worker loop plus a call to ``run_stage``. The data
is tokenized into the cache by data_prep.py, Ray and the workers' resources come from cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

from unipipe_ray.config import ConfigError, result_differences, to_dict
from unipipe_ray.runtime import tracking
from unipipe_ray.runtime.cluster import init_ray, scaling
from unipipe_ray.runtime.files import write_json_atomic
from unipipe_ray.runtime.logs import ProgressLines
from unipipe_ray.runtime.logs import progress as log_progress


def check_same_config(path: Path, config: dict) -> None:
    """Resuming into ``output_dir`` is only safe with the config that started the run: refuse otherwise.
    Called once the stage's model and data have loaded, so a typo that stopped a run is not recorded."""
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:  # not ours (our writes are atomic): say which file, do not guess
            raise ConfigError("", f"{path} is not valid JSON ({e}); move it away to start this stage afresh") from None
        diffs = [f"{key}: {a!r} -> {b!r}" for key, a, b in result_differences(old, config)]
        if diffs:
            raise ConfigError("", f"{path.parent} holds a run started with a different config ({'; '.join(diffs)}); "
                                  f"resuming it would mix the two. Use another output_dir, or delete that one.")
    else:
        write_json_atomic(path, config)


def check_same_data(path: Path, data, files: dict | None = None) -> None:
    """Like check_same_config, for the content of the files the data config reads (data/fingerprint.py):
    a resume over edited source files would train its second part on other data, so it is refused.
    ``files``: that fingerprint when the caller has it already (the data cache's key holds it)."""
    from unipipe_ray.data.fingerprint import data_changes, fingerprint

    files = fingerprint(data) if files is None else files
    if not path.exists():
        write_json_atomic(path, files)
        return
    changes = data_changes(json.loads(path.read_text()), files)
    if changes:
        raise ConfigError("", f"{path.parent} holds a run started on other data ({'; '.join(changes[:5])}"
                              f"{'; ...' if len(changes) > 5 else ''}); resuming it would train on a mix of the "
                              f"two. Use another output_dir, or delete that one.")


def write_result(output_dir: str | Path, result: dict) -> Path:
    return write_json_atomic(Path(output_dir) / "result.json", result, default=str)


class _Progress:
    """Latest (step, total, metrics) from rank 0, polled by the driver's progress bar, and every held-out
    evaluation (kept whole: a 1 s poll would miss most of them)."""

    def __init__(self, keep_lines: bool = False):
        self.state = (0, 0, {})
        self.evals: list[tuple[int, dict]] = []
        self.lines: list[tuple[int, dict]] = []  # every report, kept when the driver tracks the run (MLflow)
        # A constructor argument, not a later call: an actor Ray restarts (its node died) runs __init__ again
        # with the same arguments, and must go on keeping lines.
        self.keep_lines = keep_lines
        self.stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def stopped(self) -> str | None:
        return self.stop_reason

    def update(self, step: int, total: int, metrics: dict) -> None:
        self.state = (step, total, metrics)
        if self.keep_lines:
            self.lines.append((step, metrics))
        if any("/eval_" in k for k in metrics):
            self.evals.append((step, metrics))

    def get(self) -> tuple:
        return self.state

    def evals_from(self, i: int) -> list[tuple[int, dict]]:
        return self.evals[i:]

    def lines_from(self, i: int) -> tuple[int, list[tuple[int, dict]]]:
        """(how many lines it holds, the lines from the i-th): a restarted actor holds fewer than were read."""
        return len(self.lines), self.lines[i:]


_eval_listeners: list = []  # fn(stage, step, metrics) per held-out evaluation of a running stage (Tune trials)


@contextlib.contextmanager
def eval_listener(fn):
    """Call ``fn(stage, step, metrics)`` on the driver for every periodic evaluation of the stages run inside."""
    _eval_listeners.append(fn)
    try:
        yield
    finally:
        _eval_listeners.remove(fn)


def _pass_evals(progress, stage: str, seen: int) -> int:
    import ray

    if not _eval_listeners:
        return seen
    for step, metrics in ray.get(progress.evals_from.remote(seen)):
        for fn in list(_eval_listeners):
            fn(stage, step, metrics)
        seen += 1
    return seen


def _pass_lines(progress, tracked: int) -> int:
    """Send the report lines not yet sent to the open MLflow run (runtime/tracking.py); the new count."""
    import ray

    if not tracking.enabled():
        return tracked
    total, new = ray.get(progress.lines_from.remote(tracked))
    if total < tracked:  # the actor restarted (its node died): from its first line again
        total, new = ray.get(progress.lines_from.remote(0))
    for step, metrics in new:
        tracking.log_metrics(step, metrics)
    return total


def _fit_with_progress(trainer, progress, stage: str):
    """Run trainer.fit() in a thread while the driver draws a progress bar from the workers' reports."""
    import ray
    from tqdm import tqdm

    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=_capture(trainer.fit)), daemon=True)
    thread.start()
    # Without a terminal (ray job logs, CI) a bar's redraws are noise: the same figures come as lines.
    terminal = sys.stderr.isatty()
    bar = tqdm(desc=stage, unit="step", dynamic_ncols=True, disable=not terminal)
    lines = ProgressLines(stage)
    seen = tracked = 0
    while thread.is_alive():
        thread.join(timeout=1.0)
        seen = _pass_evals(progress, stage, seen)
        tracked = _pass_lines(progress, tracked)
        step, total, metrics = ray.get(progress.get.remote())
        if not terminal and (text := lines.line(step, total, metrics)):
            log_progress(text)
        if total and terminal:
            bar.total = total
            bar.n = step
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                             if k.endswith(("loss", "accuracy", "tokens_per_s"))}, refresh=False)
            bar.refresh()
    bar.close()
    _pass_lines(progress, tracked)  # the last lines, reported after the last poll
    outcome = box["result"]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _capture(fn):
    try:
        return fn()
    except BaseException as e:  # re-raised on the driver's main thread
        return e


def _stoppable(loop):
    """The loop as Ray Train runs it: a NonFiniteLoss ends every worker's loop normally (a retry from the
    last checkpoint would meet the same numbers) and leaves the reason with the driver, which raises it."""
    def train_func(loop_config: dict) -> None:
        from unipipe_ray.core.models import node_model
        from unipipe_ray.runtime import distributed as dist
        from unipipe_ray.runtime.loop import NonFiniteLoss

        for key in ("model_path", "ref_path"):  # a copy on this worker's node (core.models.shareable_model)
            if loop_config.get(key):
                loop_config = {**loop_config, key: node_model(loop_config[key])}
        try:
            loop(loop_config)
        except NonFiniteLoss as e:
            if dist.is_main():
                import ray

                ray.get(loop_config["progress"].stop.remote(str(e)))
    return train_func


def run_stage(stage: str, loop, cfg, kind: str, address: str | None = None, extra: dict | None = None,
              inject_failure_at: int | None = None, inject_nan_at: int | None = None,
              inject_report_death_at: int | None = None, storage: str | None = None,
              features: tuple[list, list] | None = None, extra_metrics: dict | None = None) -> dict:
    """Load and check the stage's data on the driver, then run ``loop`` on Ray Train workers.

    The run is named after the stage under ``cfg.output_dir``: running the same command again resumes
    from its latest checkpoint, and a worker failure restarts the group from it (``train.max_failures``).
    ``inject_failure_at`` (tests) kills the last worker once, in the step after that step's checkpoint;
    ``inject_nan_at`` (tests) makes a weight NaN before that step, which stops the stage (NonFiniteLoss);
    ``inject_report_death_at`` (tests) kills the last worker once while it saves and reports that step's
    checkpoint.

    ``storage``: a URI (s3://, gs://, ...) where Ray Train keeps the checkpoints instead of ``output_dir``, for
    clusters without a shared filesystem: a worker restarted on another node resumes from there, and the
    stage's checkpoint is that URI. ``output_dir`` keeps the driver's own files (config, result, tensorboard).

    ``features``: (train, eval) features made by the caller instead of read from ``cfg.data`` (DPO on the
    policy's own samples); ``extra_metrics``: figures the caller measured, added to the result's metrics.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from unipipe_ray.core.models import load_tokenizer, shareable_model
    from unipipe_ray.core.storage import open_uri
    from unipipe_ray.runtime.data_prep import cache_root, prepare_stage_data

    started = time.time()
    output_dir = Path(cfg.output_dir).resolve()
    model_path = shareable_model(cfg.model)  # convert/download once here, before the workers race for it
    tokenizer = load_tokenizer(cfg.model)
    data_info = None
    if features:
        train_feats, eval_feats = features
    else:  # tokenized once into the cache; the workers get row views and read their own rows
        train_feats, eval_feats, data_info = prepare_stage_data(cfg.data, kind, tokenizer,
                                                                cache_root(cfg.data, output_dir, storage), address)
    check_same_config(output_dir / f"{stage}_config.json", to_dict(cfg))
    check_same_data(output_dir / f"{stage}_data.json", cfg.data, data_info and data_info["files"])
    init_ray(address)
    scaling_config, threads = scaling(cfg.train)
    # On the driver's node where it can be (the driver polls it); restarted if its node dies all the same
    # (a progress bar that starts over beats a stage that fails with it).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    progress = ray.remote(num_cpus=0, scheduling_strategy=here, max_restarts=-1,
                          max_task_retries=-1)(_Progress).remote(tracking.enabled())
    loop_config = {"config": cfg, "model_path": model_path, "train_ref": ray.put(train_feats),
                   "eval_ref": ray.put(eval_feats), "tokenizer": tokenizer, "threads": threads,
                   "tensorboard_dir": str(output_dir / "tensorboard"), "progress": progress, "run": str(output_dir),
                   "inject_failure": (inject_failure_at, str(output_dir / f".{stage}_failure_injected")),
                   "inject_nan_at": inject_nan_at, "staging_dir": str(output_dir / ".staging"),
                   "inject_report_death": (inject_report_death_at,
                                           str(output_dir / f".{stage}_report_death_injected")),
                   **(extra or {})}
    where = {"storage_path": str(output_dir)}
    if storage:
        fs, path = open_uri(storage)
        where = {"storage_path": path, "storage_filesystem": fs}
    trainer = TorchTrainer(
        _stoppable(loop), train_loop_config=loop_config, scaling_config=scaling_config,
        run_config=RunConfig(name=stage, **where,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = _fit_with_progress(trainer, progress, stage)
    reason = ray.get(progress.stopped.remote())
    if reason:
        from unipipe_ray.runtime.loop import NonFiniteLoss

        kept = _checkpoint_path(result, storage) or "none (no checkpoint was saved before it)"
        raise NonFiniteLoss(f"{reason}. Last good checkpoint: {kept}")
    if extra_metrics:
        tracking.log_metrics(0, extra_metrics)
    out = {"stage": stage, "config": to_dict(cfg), "metrics": {**(result.metrics or {}), **(extra_metrics or {})},
           "checkpoint": _checkpoint_path(result, storage),
           "train_examples": len(train_feats), "eval_examples": len(eval_feats), "data": data_info,
           "seconds": round(time.time() - started, 1)}
    write_result(output_dir, out)
    return out


def _checkpoint_path(result, storage: str | None) -> str | None:
    """The result's checkpoint as the next stage loads it: a local path, or its URI under ``storage``."""
    if result.checkpoint is None:
        return None
    if not storage:
        return result.checkpoint.path
    from unipipe_ray.core.storage import join, open_uri

    root = open_uri(storage)[1]
    return join(storage, result.checkpoint.path[len(root):])
