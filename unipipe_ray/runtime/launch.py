"""Driver side of every stage: data loading and checks, Ray setup, the TorchTrainer run, progress, results.

Plain functions, not a base class: a stage module is its worker loop plus a call to ``run_stage``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import threading
import time
from pathlib import Path

from unipipe_ray.config import ConfigError, DataConfig, TrainConfig, result_differences, to_dict
from unipipe_ray.runtime.files import write_json_atomic

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ driver side


def make_task(data: DataConfig):
    """The config's task: the generated one takes a size and seed, the file-backed ones a path."""
    from unipipe_ray.data import get_task

    if data.task == "arith":
        return get_task("arith", n=data.task_size, seed=data.seed)
    if data.task_path is None:
        raise ValueError(f"data.task={data.task!r} reads a file: set data.task_path")
    task = get_task(data.task, path=data.task_path, on_bad_record=data.on_bad_record)
    if task.report.skipped:
        log.warning("task %s (%s): %s", data.task, data.task_path, task.report.summary())
    return task


def stage_examples(data: DataConfig, kind: str) -> tuple[list, list]:
    """Examples of ``kind`` (sft | preference | prompt) -> (train, held-out eval), before tokenization.

    User sources win over the built-in task. The eval split is taken before ``size`` so that it does not
    change when the training size does. Bad records follow ``on_bad_record``; skips are logged with counts.
    """
    from unipipe_ray.data import load_examples

    if data.sources:
        examples, report = load_examples(kind, [(s.path, s.weight) for s in data.sources],
                                         on_bad_record=data.on_bad_record, seed=data.seed)
    else:
        task = make_task(data)
        examples, report = {"sft": task.sft_examples, "prompt": task.prompts,
                            "preference": lambda: task.preference_pairs(seed=data.seed)}[kind](), None
    if report is not None and (report.skipped or report.notes):  # skips, and what a mixture repeated
        log.warning("%s", report.summary())
    order = list(range(len(examples)))
    random.Random(data.seed).shuffle(order)
    if data.eval_size >= len(examples):
        raise ValueError(f"data.eval_size={data.eval_size} leaves no training data ({len(examples)} examples)")
    train_examples = [examples[i] for i in order[data.eval_size:]]
    if data.size is not None:
        if data.size > len(train_examples):
            log.warning("data.size=%d, but only %d training examples remain after the %d held out: using %d",
                        data.size, len(train_examples), data.eval_size, len(train_examples))
        train_examples = train_examples[:data.size]
    if data.budget is not None:
        train_examples = budget_part(train_examples, data, kind)
    return train_examples, [examples[i] for i in order[:data.eval_size]]


def budget_part(pool: list, data: DataConfig, kind: str) -> list:
    """This stage's share of ``data.budget`` questions of the training pool: the SFT indices of budget_split
    for kind sft, the preference ones for kind preference. Both stages see the same pool in the same order
    (same task, same seed), so the two shares are disjoint questions."""
    from unipipe_ray.data import budget_split

    if kind not in ("sft", "preference"):
        raise ValueError(f"data.budget splits SFT and preference data; a {kind} stage cannot use it")
    if data.budget > len(pool):
        raise ValueError(f"data.budget={data.budget} exceeds the {len(pool)} training questions of task "
                         f"{data.task!r} (raise data.task_size or lower the budget)")
    sft, pref = budget_split(len(pool), data.budget, data.sft_ratio, data.budget_seed)
    picked = sft if kind == "sft" else pref
    if not picked:
        raise ValueError(f"data.budget={data.budget} at sft_ratio={data.sft_ratio} leaves no {kind} data: "
                         f"skip this stage")
    return [pool[i] for i in picked]


def load_stage_data(data: DataConfig, kind: str, tokenizer) -> tuple[list, list, list]:
    """(train features, eval features, eval examples): ``stage_examples`` tokenized (chat template, masks)."""
    from unipipe_ray.data import tokenize_all

    train_examples, eval_examples = stage_examples(data, kind)
    features = [tokenize_all(part, kind, tokenizer, data.max_length, data.on_bad_record,
                             max_prompt_length=data.max_prompt_length) for part in (train_examples, eval_examples)]
    return features[0], features[1], eval_examples


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local cluster on this machine."""
    import ray

    if ray.is_initialized():
        return
    # Ray Train blocks ~2 s in every report() at the default health-check interval; 0.1 s keeps it cheap.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Workers must not pick a GPU accelerator that is not there (DeepSpeed probes at import).
    # Inside a Ray job the job's runtime env already reaches every worker, and Ray refuses to merge a key it
    # sets with ours ("Failed to merge the Job's runtime env"): pass only what the job leaves unset.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}) or {}
    taken = set(job_env.get("env_vars") or {})
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("UNIPIPE_CACHE", "UNIPIPE_SMOLLM2_GGUF",
                                                          "UNIPIPE_SHARED_DATA", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
                                if k in os.environ and k not in taken}}
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env,
             num_cpus=num_cpus, log_to_driver=True)


def scaling(train: TrainConfig):
    """ScalingConfig for a stage: workers share the local CPUs (Ray's CPU counts are scheduling tokens)."""
    import ray
    from ray.train import ScalingConfig

    if train.use_gpu:
        return ScalingConfig(num_workers=train.num_workers, use_gpu=True), 1
    if train.cpus_per_worker is not None:
        return ScalingConfig(num_workers=train.num_workers, resources_per_worker={"CPU": train.cpus_per_worker}), \
            max(1, round(train.cpus_per_worker))
    cpus = ray.cluster_resources().get("CPU", 1)
    # 0.9 leaves room for Ray Train's controller so 2 workers fit on a 2-core machine.
    per_worker = max(0.9, math.floor(cpus / train.num_workers * 10) / 10 - 0.1)
    return ScalingConfig(num_workers=train.num_workers, resources_per_worker={"CPU": per_worker}), \
        max(1, int(per_worker + 0.1))


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


def write_result(output_dir: str | Path, result: dict) -> Path:
    return write_json_atomic(Path(output_dir) / "result.json", result, default=str)


class _Progress:
    """Latest (step, total, metrics) from rank 0, polled by the driver's progress bar, and every held-out
    evaluation (kept whole: a 1 s poll would miss most of them)."""

    def __init__(self):
        self.state = (0, 0, {})
        self.evals: list[tuple[int, dict]] = []
        self.stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def stopped(self) -> str | None:
        return self.stop_reason

    def update(self, step: int, total: int, metrics: dict) -> None:
        self.state = (step, total, metrics)
        if any("/eval_" in k for k in metrics):
            self.evals.append((step, metrics))

    def get(self) -> tuple:
        return self.state

    def evals_from(self, i: int) -> list[tuple[int, dict]]:
        return self.evals[i:]


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


def _fit_with_progress(trainer, progress, stage: str):
    """Run trainer.fit() in a thread while the driver draws a progress bar from the workers' reports."""
    import ray
    from tqdm import tqdm

    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=_capture(trainer.fit)), daemon=True)
    thread.start()
    # Without a terminal (ray job logs, CI) the rank-0 progress lines say the same without redraw noise.
    bar = tqdm(desc=stage, unit="step", dynamic_ncols=True, disable=not sys.stderr.isatty())
    seen = 0
    while thread.is_alive():
        thread.join(timeout=1.0)
        seen = _pass_evals(progress, stage, seen)
        step, total, metrics = ray.get(progress.get.remote())
        if total:
            bar.total = total
            bar.n = step
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                             if k.endswith(("loss", "accuracy", "tokens_per_s"))}, refresh=False)
            bar.refresh()
    bar.close()
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
        from unipipe_ray.runtime import distributed as dist
        from unipipe_ray.runtime.loop import NonFiniteLoss

        try:
            loop(loop_config)
        except NonFiniteLoss as e:
            if dist.is_main():
                import ray

                ray.get(loop_config["progress"].stop.remote(str(e)))
    return train_func


def run_stage(stage: str, loop, cfg, kind: str, address: str | None = None, extra: dict | None = None,
              inject_failure_at: int | None = None, inject_nan_at: int | None = None) -> dict:
    """Load and check the stage's data on the driver, then run ``loop`` on Ray Train workers.

    The run is named after the stage under ``cfg.output_dir``: running the same command again resumes
    from its latest checkpoint, and a worker failure restarts the group from it (``train.max_failures``).
    ``inject_failure_at`` (tests) kills the last worker once, in the step after that step's checkpoint;
    ``inject_nan_at`` (tests) makes a weight NaN before that step, which stops the stage (NonFiniteLoss).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from unipipe_ray.core.models import load_tokenizer, resolve_model

    started = time.time()
    output_dir = Path(cfg.output_dir).resolve()
    model_path = resolve_model(cfg.model)  # convert/download once here, before the workers race for it
    tokenizer = load_tokenizer(cfg.model)
    train_feats, eval_feats, _ = load_stage_data(cfg.data, kind, tokenizer)
    check_same_config(output_dir / f"{stage}_config.json", to_dict(cfg))
    init_ray(address)
    scaling_config, threads = scaling(cfg.train)
    progress = ray.remote(num_cpus=0)(_Progress).remote()
    loop_config = {"config": cfg, "model_path": model_path, "train_ref": ray.put(train_feats),
                   "eval_ref": ray.put(eval_feats), "tokenizer": tokenizer, "threads": threads,
                   "tensorboard_dir": str(output_dir / "tensorboard"), "progress": progress,
                   "inject_failure": (inject_failure_at, str(output_dir / f".{stage}_failure_injected")),
                   "inject_nan_at": inject_nan_at, "staging_dir": str(output_dir / ".staging"),
                   **(extra or {})}
    trainer = TorchTrainer(
        _stoppable(loop), train_loop_config=loop_config, scaling_config=scaling_config,
        run_config=RunConfig(name=stage, storage_path=str(output_dir),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = _fit_with_progress(trainer, progress, stage)
    reason = ray.get(progress.stopped.remote())
    if reason:
        from unipipe_ray.runtime.loop import NonFiniteLoss

        kept = result.checkpoint.path if result.checkpoint else "none (no checkpoint was saved before it)"
        raise NonFiniteLoss(f"{reason}. Last good checkpoint: {kept}")
    out = {"stage": stage, "config": to_dict(cfg), "metrics": result.metrics,
           "checkpoint": result.checkpoint.path if result.checkpoint else None,
           "train_examples": len(train_feats), "eval_examples": len(eval_feats),
           "seconds": round(time.time() - started, 1)}
    write_result(output_dir, out)
    return out
