"""What every stage does the same way on the driver and in its workers: data, batching, Ray setup, metrics.

Plain functions, not a base class: each stage's loop stays readable top to bottom and calls these.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from pathlib import Path

import torch

from unipipe_ray.config import DataConfig, TrainConfig

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ driver side


def make_task(data: DataConfig):
    """The config's task: the generated one takes a size and seed, the file-backed ones a path."""
    from unipipe_ray.data import get_task

    if data.task == "arith":
        return get_task("arith", n=data.task_size, seed=data.seed)
    if data.task_path is None:
        raise ValueError(f"data.task={data.task!r} reads a file: set data.task_path")
    return get_task(data.task, path=data.task_path)


def load_stage_data(data: DataConfig, kind: str, tokenizer) -> tuple[list, list, list]:
    """Examples of ``kind`` (sft | preference | prompt) -> (train features, eval features, eval examples).

    User sources win over the built-in task. The eval split is taken before ``size`` so that it does not
    change when the training size does. Bad records follow ``on_bad_record``; skips are logged with counts.
    """
    from unipipe_ray.data import load_examples, tokenize_all

    if data.sources:
        examples, report = load_examples(kind, [(s.path, s.weight) for s in data.sources],
                                         on_bad_record=data.on_bad_record, seed=data.seed)
    else:
        task = make_task(data)
        examples, report = {"sft": task.sft_examples, "prompt": task.prompts,
                            "preference": lambda: task.preference_pairs(seed=data.seed)}[kind](), None
    if report is not None and report.skipped:
        log.warning("%s", report.summary())
    order = list(range(len(examples)))
    random.Random(data.seed).shuffle(order)
    if data.eval_size >= len(examples):
        raise ValueError(f"data.eval_size={data.eval_size} leaves no training data ({len(examples)} examples)")
    eval_examples = [examples[i] for i in order[:data.eval_size]]
    train_examples = [examples[i] for i in order[data.eval_size:]]
    if data.size is not None:
        train_examples = train_examples[:data.size]
    features = []
    for part in (train_examples, eval_examples):
        features.append(tokenize_all(part, kind, tokenizer, data.max_length, data.on_bad_record,
                                     max_prompt_length=data.max_prompt_length))
    return features[0], features[1], eval_examples


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local cluster on this machine."""
    import ray

    if ray.is_initialized():
        return
    # Ray Train blocks ~2 s in every report() at the default health-check interval; 0.1 s keeps it cheap.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Workers must not pick a GPU accelerator that is not there (DeepSpeed probes at import).
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("UNIPIPE_CACHE", "UNIPIPE_SMOLLM2_GGUF",
                                                          "UNIPIPE_SHARED_DATA", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
                                if k in os.environ}}
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env,
             num_cpus=num_cpus, log_to_driver=True)


def scaling(train: TrainConfig):
    """ScalingConfig for a stage: workers share the local CPUs (Ray's CPU counts are scheduling tokens)."""
    import ray
    from ray.train import ScalingConfig

    if train.use_gpu:
        return ScalingConfig(num_workers=train.num_workers, use_gpu=True), 1
    cpus = ray.cluster_resources().get("CPU", 1)
    # 0.9 leaves room for Ray Train's controller so 2 workers fit on a 2-core machine.
    per_worker = max(0.9, math.floor(cpus / train.num_workers * 10) / 10 - 0.1)
    return ScalingConfig(num_workers=train.num_workers, resources_per_worker={"CPU": per_worker}), \
        max(1, int(per_worker + 0.1))


def write_result(output_dir: str | Path, result: dict) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


# ------------------------------------------------------------------------------------------ worker side


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report() call at INFO; our rank-0 progress line already says it."""
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)


def step_batches(n_examples: int, batch_size: int, grad_accum: int, world: int, rank: int, step: int,
                 seed: int) -> list[list[int]]:
    """Indices of this rank's micro-batches for optimizer step ``step``.

    The global order is a seeded permutation per epoch, so any step's batch is a pure function of
    (seed, step): resuming at step k needs no iterator state. Each step consumes batch*accum*world examples.
    """
    per_step = batch_size * grad_accum * world
    steps_per_epoch = max(1, n_examples // per_step)
    epoch, pos = divmod(step, steps_per_epoch)
    order = list(range(n_examples))
    random.Random(seed * 100003 + epoch).shuffle(order)
    chunk = order[pos * per_step:(pos + 1) * per_step]
    mine = chunk[rank::world]
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(grad_accum)]


def total_steps(n_examples: int, train: TrainConfig, world: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    per_step = train.batch_size * train.grad_accum * world
    if n_examples < per_step:
        raise ValueError(f"{n_examples} training examples cannot fill one step of {per_step} "
                         f"(batch_size x grad_accum x num_workers)")
    return max(1, int(train.epochs * (n_examples // per_step)))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Throughput:
    """Tokens per second between calls."""

    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self, tokens: float) -> float:
        now = time.perf_counter()
        rate, self.t = tokens / max(now - self.t, 1e-9), now
        return rate
