"""SFT stage: next-token NLL on the response tokens, run by Ray Train's TorchTrainer on N workers.

``train_loop`` is the whole procedure on one worker, top to bottom: setup (or resume), loop, eval, save.
``run_sft`` is the driver: it checks the data once and starts the workers (see ``launch.run_stage``).
"""

from __future__ import annotations

import torch

from unipipe_ray.config import SFTConfig, chunk_size
from unipipe_ray.core.forward import token_logps_of
from unipipe_ray.core.logps import IGNORE_INDEX
from unipipe_ray.core.losses import masked_sum, sft_loss
from unipipe_ray.runtime import distributed as dist
from unipipe_ray.runtime import launch, loop


@torch.no_grad()
def evaluate(model, features: list[dict], batch_size: int, pad_id: int, device, chunk: int | None = None,
             packing: bool = False) -> dict:
    """Token-mean NLL over the held-out set (each rank takes every world-th example), reduced over ranks."""
    from unipipe_ray.data import collate_sft

    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    mine = features[dist.rank()::dist.world_size()]
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate_sft(mine[i:i + batch_size], pad_id).items()}
        logps, mask = token_logps_of(model, model, batch, chunk, packing)
        total, count = total - masked_sum(logps, mask).double().cpu(), count + mask.sum().cpu()
    model.train()
    total, count = dist.all_reduce_sum(total), dist.all_reduce_sum(count)
    return {"sft/eval_loss": float(total / count.clamp(min=1))}


def sams_pretrainer(cfg: SFTConfig, module, seed: int, resumed: dict):
    """Rank 0's SamS pretrainer when the config asks for one (`sams_pretrain`), else None."""
    if not cfg.sams_pretrain or not dist.is_main():
        return None
    from unipipe_ray.core.sams import SamsScheduler
    from unipipe_ray.core.sams_pretrain import STATE_KEY, SftPretrainer

    sched = SamsScheduler(module.config.hidden_size, module.config.num_hidden_layers,
                          cfg.sams, seed=seed)
    pretrainer = SftPretrainer(sched)
    if STATE_KEY in resumed:
        pretrainer.load_state_dict(resumed[STATE_KEY])
    return pretrainer


def sams_pretrain_round(pretrainer, module, batch: dict, chunk: int | None) -> dict:
    """Before the step: every rank's no-grad forward of its micro-batch, gathered; rank 0 pretrains."""
    from unipipe_ray.core.sams_pretrain import sft_arm_inputs

    features, losses = sft_arm_inputs(module, batch, chunk)
    features, losses = dist.all_gather_cat(features), dist.all_gather_cat(losses)
    return pretrainer.step(features, losses) if pretrainer is not None else {}


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    from unipipe_ray.data import collate_sft

    run = loop.start_run("sft", loop_config)
    train, engine, device = run.train, run.engine, run.device
    chunk = chunk_size(train)
    evaluate_now = lambda: evaluate(engine.module, run.eval_feats, train.batch_size, run.pad_id, device, chunk,
                                    train.packing)
    pretrain = run.cfg.sams_pretrain
    pretrainer = sams_pretrainer(run.cfg, engine.module, train.seed, run.resumed_extra)
    if pretrainer is not None:
        run.extra_state = lambda: {"sams_pretrain": pretrainer.state_dict()}
    dist.print0(f"sft: {len(run.train_feats)} train / {len(run.eval_feats)} eval examples, {run.world} "
                f"worker(s), {run.steps} steps of {run.per_step} examples")
    if run.start == 0 and run.eval_feats:
        run.reporter.line(0, evaluate_now())

    metrics = dict(run.metrics)
    for step in range(run.start, run.steps):
        batches = run.micro_batches(step, collate_sft)
        # Normalise by the global response-token count / world: DDP's gradient mean then gives the exact
        # token mean over the whole step, whatever the split into ranks and micro-batches.
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        normalizer = float(dist.all_reduce_sum(local_tokens)) / run.world
        run.reporter.count_tokens(batches)
        step_loss, sams_metrics = 0.0, {}
        for batch in batches:
            if pretrain:
                sams_metrics = sams_pretrain_round(pretrainer, engine.module, batch, chunk)
            # packing: the forward runs without padding, the log-probs come back padded (same normaliser)
            logps = token_logps_of(engine, engine.module, batch, chunk, train.packing)
            loss = sft_loss(*logps, mode="token", normalizer=normalizer)
            engine.backward(loss)
            step_loss += float(loss.detach())
        info = engine.step()
        metrics = {"sft/loss": float(dist.all_reduce_mean(step_loss)), **sams_metrics,
                   **run.reporter.step_metrics(info, device, step + 1)}
        loop.end_of_step(run, step + 1, metrics, evaluate_now)
    loop.finish(run, metrics, evaluate_now)


def run_sft(cfg: SFTConfig, address: str | None = None, inject_failure_at: int | None = None,
            inject_nan_at: int | None = None, inject_report_death_at: int | None = None,
           storage: str | None = None) -> dict:
    """Train on a Ray cluster (local when no address); return metrics and the checkpoint path."""
    return launch.run_stage("sft", train_loop, cfg, "sft", address, inject_failure_at=inject_failure_at,
                            inject_nan_at=inject_nan_at, inject_report_death_at=inject_report_death_at,
                            storage=storage)
