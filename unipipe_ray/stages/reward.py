"""Reward-model stage: a scalar head on the last real token (core/reward_head.py), Bradley-Terry loss, run by
Ray Train on N workers.
"""

from __future__ import annotations

import torch

from unipipe_ray.config import RMConfig
from unipipe_ray.core.losses import bradley_terry_loss, reduce_loss
from unipipe_ray.core.reward_head import pair_rewards
from unipipe_ray.runtime import distributed as dist
from unipipe_ray.runtime import launch, loop


@torch.no_grad()
def evaluate(model, features: list[dict], batch_size: int, pad_id: int, margin: float, device,
             packing: bool = False) -> dict:
    """Bradley-Terry loss and ranking accuracy on the held-out pairs, reduced over ranks."""
    from unipipe_ray.data import collate_preference

    model.eval()
    loss, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    mine = features[dist.rank()::dist.world_size()]
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate_preference(mine[i:i + batch_size], pad_id).items()}
        losses, accuracies = bradley_terry_loss(*pair_rewards(model, model, batch, packing), margin=margin or None)
        loss, correct = loss + losses.double().sum().cpu(), correct + accuracies.double().sum().cpu()
    model.train()
    n = len(features)
    return {"rm/eval_loss": float(dist.all_reduce_sum(loss)) / n,
            "rm/eval_accuracy": float(dist.all_reduce_sum(correct)) / n}


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    from unipipe_ray.data import collate_preference

    pad_id = loop_config["tokenizer"].pad_token_id
    run = loop.start_run("rm", loop_config, kind="reward",
                           configure=lambda model: setattr(model.config, "pad_token_id", pad_id))
    cfg, train, engine, device = run.cfg, run.train, run.engine, run.device
    evaluate_now = lambda: evaluate(engine.module, run.eval_feats, train.batch_size, pad_id, cfg.margin, device,
                                    train.packing)
    dist.print0(f"rm: {len(run.train_feats)} train / {len(run.eval_feats)} eval pairs, {run.world} worker(s), "
                f"{run.steps} steps of {run.per_step} pairs")
    if run.start == 0 and run.eval_feats:
        run.reporter.line(0, evaluate_now())

    metrics = dict(run.metrics)
    for step in range(run.start, run.steps):
        batches = run.micro_batches(step, collate_preference)
        run.reporter.count_tokens(batches)
        sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, margin over this rank's pairs
        for batch in batches:
            chosen, rejected = pair_rewards(engine, engine.module, batch, train.packing)
            losses, accuracies = bradley_terry_loss(chosen, rejected, margin=cfg.margin or None)
            # Sum / (global pairs / world): DDP's gradient mean is then the mean over the whole step's pairs.
            engine.backward(reduce_loss(losses, mode="example", normalizer=run.per_step / run.world))
            sums += torch.stack([losses.sum(), accuracies.sum(), (chosen - rejected).sum()]).detach().double().cpu()
        info = engine.step()
        loss, accuracy, margin = (dist.all_reduce_sum(sums) / run.per_step).tolist()
        metrics = {"rm/loss": loss, "rm/accuracy": accuracy, "rm/reward_margin": margin,
                   **run.reporter.step_metrics(info, device, step + 1)}
        loop.end_of_step(run, step + 1, metrics, evaluate_now)
    loop.finish(run, metrics, evaluate_now)


def run_rm(cfg: RMConfig, address: str | None = None, inject_failure_at: int | None = None,
           storage: str | None = None) -> dict:
    """Reward-model training on a Ray cluster (local when no address); return metrics and the checkpoint."""
    return launch.run_stage("rm", train_loop, cfg, "preference", address, inject_failure_at=inject_failure_at,
                            storage=storage)
