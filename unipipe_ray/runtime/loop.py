"""Worker-side pieces every stage loop calls: setup or resume, batching by step, reporting, end of step.

Plain functions and two small classes, no trainer hierarchy: each stage's loop stays readable top to
bottom and calls these. Everything here runs inside a Ray Train worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import resource
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from unipipe_ray.config import TrainConfig
from unipipe_ray.core.packing import check_model_packs
from unipipe_ray.runtime import distributed as dist
from unipipe_ray.runtime import tracking
from unipipe_ray.runtime.checkpoint import load_trainable, restore_state, save_and_report
from unipipe_ray.runtime.devices import train_device
from unipipe_ray.runtime.engine import TrainingEngine
from unipipe_ray.runtime.logs import quiet_ray_train_logs
from unipipe_ray.runtime.metrics import export as export_metrics

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """A loss or gradient norm became NaN or inf: the stage stops at that step and keeps its last checkpoint
    (a retry from that checkpoint would meet the same numbers, so Ray Train is not asked to retry)."""


def non_finite(metrics: dict) -> dict:
    """The loss and gradient-norm entries of ``metrics`` that are NaN or inf."""
    return {k: v for k, v in metrics.items()
            if k.endswith(("loss", "grad_norm")) and isinstance(v, float) and not math.isfinite(v)}


def check_finite(stage: str, step: int, metrics: dict) -> None:
    bad = non_finite(metrics)
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFiniteLoss(f"{stage}: non-finite {shown} at step {step}; stopped without saving this step "
                            f"(lower train.lr, check the data, or use float32)")


def setup(threads: int, seed: int) -> None:
    quiet_ray_train_logs()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)


def make_training_engine(model, train: TrainConfig, steps: int) -> TrainingEngine:
    return TrainingEngine(model, train.lr, train.weight_decay, train.max_grad_norm, steps,
                       warmup_steps=int(train.warmup_ratio * steps), grad_accum=train.grad_accum,
                       backend=train.backend, zero_stage=train.zero_stage,
                       offload_optimizer=train.offload_optimizer, bf16=train.dtype == "bfloat16")


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
    per_step = train.batch_size * train.grad_accum * world
    if n_examples < per_step:
        raise ValueError(f"{n_examples} training examples cannot fill one step of {per_step} "
                         f"(batch_size x grad_accum x num_workers)")
    if train.max_steps is not None:
        return train.max_steps
    return max(1, int(train.epochs * (n_examples // per_step)))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Reporter:
    """Metrics out: rank-0 progress line, TensorBoard (rank 0), the driver's progress bar, Ray Train."""

    def __init__(self, stage: str, steps: int, tensorboard_dir: str | None, progress=None, run: str = ""):
        self.stage, self.steps, self.progress, self.run = stage, steps, progress, run
        self.t, self.tokens = time.perf_counter(), 0.0
        self.tokens_total = 0.0  # trained tokens since this process started the stage (a resume starts over)
        self.writer = None
        if tensorboard_dir and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)

    def count_tokens(self, batches: list[dict]) -> None:
        """Add this step's tokens (all ranks, padding excluded) to the throughput counter."""
        step_tokens = float(dist.all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in batches)))
        self.tokens += step_tokens
        self.tokens_total += step_tokens

    def throughput(self) -> dict:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0.0
        return {f"{self.stage}/tokens_per_s": rate, f"{self.stage}/tokens_total": self.tokens_total}

    def step_metrics(self, info: dict, device: torch.device, step: int) -> dict:
        """What every stage reports after an optimizer step besides its losses."""
        return {f"{self.stage}/lr": info["lr"], f"{self.stage}/grad_norm": info["grad_norm"], **self.throughput(),
                f"{self.stage}/peak_memory_mb": peak_memory_mb(device), "step": step}

    def line(self, step: int, metrics: dict, final: bool = False) -> None:
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k != "step")
        dist.print0(f"{self.stage}: step {step}/{self.steps}{' (final)' if final else ''} {shown}")
        if self.writer:
            for k, v in metrics.items():
                if k != "step":
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.progress is not None and dist.is_main():
            self.progress.update.remote(step, self.steps, metrics)
        if dist.is_main():  # Ray's metrics endpoint: the dashboard, Grafana, Prometheus (runtime/metrics.py)
            export_metrics(metrics | {"step": step}, self.run, self.stage, dist.rank())
            # MLflow, where this process has a run open: PPO's controller in the driver (runtime/tracking.py);
            # Ray Train workers have none, their lines reach the driver's run through the progress actor
            tracking.log_metrics(step, metrics)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


@dataclass
class Run:
    """What a stage loop works with once set up (or resumed) on this worker."""

    cfg: object
    train: TrainConfig
    train_feats: list
    eval_feats: list
    tokenizer: object
    device: torch.device
    world: int
    rank: int
    steps: int
    start: int
    engine: TrainingEngine
    reporter: Reporter
    metrics: dict          # the last reported metrics (restored on resume)
    resumed_extra: dict    # what the loop's extra_state returned at the checkpoint resumed from (rank 0)
    inject_failure: tuple = (None, None)  # (step, marker file): tests only
    inject_nan_at: int | None = None  # tests only: a parameter becomes NaN before this step's forward
    inject_report_death: tuple = (None, None)  # tests only: (step, marker file), a death inside that report
    last_save: float = field(default_factory=time.monotonic)  # when this attempt last saved (or started)
    staging_dir: str | None = None  # where checkpoint files are written before Ray Train copies them
    extra_state: object = dict  # () -> dict of loop state saved in checkpoints (rank 0), e.g. the scheduler

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def per_step(self) -> int:
        """Examples per optimizer step over all ranks."""
        return self.train.batch_size * self.train.grad_accum * self.world

    def batch_indices(self, step: int) -> list[list[int]]:
        return step_batches(len(self.train_feats), self.train.batch_size, self.train.grad_accum, self.world,
                            self.rank, step, self.train.seed)

    def micro_batches(self, step: int, collate) -> list[dict]:
        """This rank's micro-batches of optimizer step ``step``, collated and on the device."""
        if self.inject_nan_at == step + 1:
            with torch.no_grad():
                next(p for p in self.engine.module.parameters() if p.requires_grad).fill_(math.nan)
        return [{k: v.to(self.device) for k, v in collate([self.train_feats[i] for i in idx], self.pad_id).items()}
                for idx in self.batch_indices(step)]


def start_run(stage: str, loop_config: dict, kind: str = "causal", configure=None) -> Run:
    """Common setup of a stage loop: threads/seed, data from the object store, model (fresh or from Ray
    Train's latest checkpoint), engine, optimizer state on resume, reporter. ``configure(model)`` may adjust
    the model before the engine wraps it."""
    import ray
    import ray.train

    cfg = loop_config["config"]
    train = cfg.train
    setup(loop_config["threads"], train.seed)
    train_feats, eval_feats = ray.get(loop_config["train_ref"]), ray.get(loop_config["eval_ref"])
    device, world = train_device(train.use_gpu), dist.world_size()
    steps = total_steps(len(train_feats), train, world)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume:
        resume = None if resume is None else Path(resume)
        model = load_trainable(loop_config["model_path"], resume, train, kind).to(device)
        if configure:
            configure(model)
        engine = make_training_engine(model, train, steps)
        if train.packing:  # before any step: a model that cannot pack is refused, not trained wrongly
            train = packing_checked(engine.module, train)
        start, metrics, extra = restore_state(engine, resume)
    reporter = Reporter(stage, steps, loop_config["tensorboard_dir"], loop_config["progress"],
                        run=loop_config.get("run", ""))
    return Run(cfg, train, train_feats, eval_feats, loop_config["tokenizer"], device, world, dist.rank(), steps,
               start, engine, reporter, metrics, extra,
               inject_failure=loop_config.get("inject_failure", (None, None)),
               inject_nan_at=loop_config.get("inject_nan_at"), staging_dir=loop_config.get("staging_dir"),
               inject_report_death=loop_config.get("inject_report_death", (None, None)))


def packing_checked(module, train):
    """``train`` as it may run on ``module``: packing: true on a model whose attention ignores packing is
    refused (check_model_packs raises); auto falls back to padded batches, said once."""
    if train.packing is True:
        check_model_packs(module)
        return train
    try:
        check_model_packs(module)
    except ValueError as e:
        if dist.is_main():
            log.warning("%s; packing: auto runs padded batches instead", str(e).split(";")[0])
        return replace(train, packing=False)
    return train


def end_of_step(run: Run, done: int, metrics: dict, evaluate) -> None:
    """After optimizer step ``done``: periodic eval, progress line, checkpoint or plain report.
    The last step is left to ``finish``."""
    import ray.train

    train = run.train
    _stop_if_non_finite(run, done, metrics)
    _maybe_inject_failure(run, done)
    if done == run.steps:
        return
    if train.eval_every and done % train.eval_every == 0:
        metrics.update(evaluate())
    if done % train.log_every == 0:
        run.reporter.line(done, metrics)
    if (train.checkpoint_every and done % train.checkpoint_every == 0) or _minutes_since_save_due(run):
        _maybe_die_inside_report(run, done)
        save_and_report(run.engine, done, metrics, run.tokenizer, train.lora, run.extra_state(), run.staging_dir)
        run.last_save = time.monotonic()
    elif done % train.log_every == 0:
        ray.train.report(metrics)


def _minutes_since_save_due(run: Run) -> bool:
    """train.checkpoint_minutes passed since the last save, by rank 0's clock: every rank must take part in
    a save, so rank 0 decides for all (one scalar all-reduce per step)."""
    minutes = run.train.checkpoint_minutes
    if not minutes:
        return False
    late = float(dist.is_main() and time.monotonic() - run.last_save >= minutes * 60)
    return bool(dist.all_reduce_sum(late) > 0)


def _stop_if_non_finite(run: Run, done: int, metrics: dict) -> None:
    # The losses and the norm are all-reduced, so every rank stops at the same step (no rank is left
    # waiting in a collective). The engine is closed here: the loop does not reach finish().
    try:
        check_finite(run.reporter.stage, done, metrics)
    except NonFiniteLoss:
        run.reporter.close()
        run.engine.close()
        raise


def _maybe_inject_failure(run: Run, done: int) -> None:
    """Test hook: the last rank dies hard once (a marker file makes it once) during the step after
    checkpoint ``at``. The pause first lets Ray Train's controller register that checkpoint, as it would
    have for a failure that comes later; a worker that dies right inside report() can take it along."""
    at, marker = run.inject_failure
    if at is not None and done == at + 1 and run.rank == run.world - 1 and not Path(marker).exists():
        Path(marker).touch()
        time.sleep(2.0)
        log.warning("%s: injected failure in step %d (test hook)", run.reporter.stage, done)
        os._exit(1)


# Long enough for the save to start, short enough to land inside it: a tiny model's save and report take
# ~0.5-2 s here, so the death falls in the write, the copy to storage or the registration.
REPORT_DEATH_DELAY_S = 0.2


def _maybe_die_inside_report(run: Run, done: int) -> None:
    """Test hook: the last rank dies hard once, from a timer, while it saves and reports checkpoint ``done``."""
    at, marker = run.inject_report_death
    if at is not None and done == at and run.rank == run.world - 1 and not Path(marker).exists():
        Path(marker).touch()
        log.warning("%s: injected death inside the report of step %d (test hook)", run.reporter.stage, done)
        threading.Timer(REPORT_DEATH_DELAY_S, os._exit, args=(1,)).start()


def finish(run: Run, metrics: dict, evaluate) -> None:
    """Final eval, last progress line, and the final checkpoint (a Hugging Face model dir)."""
    _stop_if_non_finite(run, run.steps, metrics)
    if run.eval_feats:
        metrics.update(evaluate())
    metrics["resumed_at_step"] = run.start  # 0: a fresh run; k: this attempt continued from checkpoint k
    read = getattr(run.train_feats, "rows_read", None)
    if read is not None:  # training rows each rank turned into Python (cached data): its share, not the set
        per_rank = dist.all_gather_cat(torch.tensor([float(read)]))
        metrics["data/rows_read_min"], metrics["data/rows_read_max"] = per_rank.min().item(), per_rank.max().item()
    run.reporter.line(run.steps, metrics, final=True)
    run.reporter.close()
    save_and_report(run.engine, run.steps, metrics, run.tokenizer, run.train.lora, run.extra_state(),
                    run.staging_dir)
    run.engine.close()  # DeepSpeed's engine would otherwise outlive the loop in reference cycles
