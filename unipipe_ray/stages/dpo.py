"""DPO stage (and its family: IPO, cDPO label smoothing, SimPO), run by Ray Train on N workers.

``train_loop`` is the whole procedure on one worker; its pieces (the loss, the reference scorer, the pair
selector) are in dpo_pairs.py. The reference is the stage's input model unless ``ref_model`` is set; with
``precompute_ref_logps`` it scores every pair once up front and is then freed. SimPO has no reference.
"""

from __future__ import annotations

import torch

from unipipe_ray.config import DPOConfig, chunk_size
from unipipe_ray.core.losses import reduce_loss
from unipipe_ray.runtime import checkpoint, launch, loop
from unipipe_ray.runtime import distributed as dist
from unipipe_ray.stages.dpo_pairs import (
    PairLoss,
    PairSelector,
    RefScorer,
    no_grad_chunk,
    pair_logps,
    pair_metrics,
    reduce_metrics,
)


@torch.no_grad()
def evaluate(loss: PairLoss, model, ref: RefScorer, features: list[dict], batch_size: int, pad_id: int, device,
             chunk: int | None, packing: bool = False) -> dict:
    """DPO metrics on the held-out pairs (rank r takes every world-th pair), reduced over ranks."""
    from unipipe_ray.data import collate_preference

    model.eval()
    sums: dict = {}
    indices = list(range(dist.rank(), len(features), dist.world_size()))
    for i in range(0, len(indices), batch_size):
        idx = indices[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate_preference([features[j] for j in idx], pad_id).items()}
        policy = pair_logps(model, batch, loss.average_logps, chunk_size=chunk, packing=packing)
        refs = ref(batch, [("eval", j) for j in idx]) if loss.needs_reference else None
        for k, v in pair_metrics("dpo/eval_", *loss(policy, refs), *policy).items():
            sums[k] = sums.get(k, 0) + v
    model.train()
    return reduce_metrics(sums, len(features))


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    from unipipe_ray.data import collate_preference, select_pairs

    run = loop.start_run("dpo", loop_config)
    cfg, train, engine, device, pad_id = run.cfg, run.train, run.engine, run.device, run.pad_id
    chunk, loss = chunk_size(train), PairLoss.of(cfg)
    ref = RefScorer(checkpoint.load_frozen(loop_config["ref_path"], train).to(device) if loss.needs_reference
                    else None, no_grad_chunk(chunk), train.packing)
    schedule = {step: run.batch_indices(step) for step in range(run.start, run.steps)}
    if cfg.precompute_ref_logps and ref.model is not None:
        # Every pair this rank will see, plus its eval share: the reference runs once and is freed.
        keys = sorted({("train", i) for batches in schedule.values() for idx in batches for i in idx}
                      | {("eval", i) for i in range(run.rank, len(run.eval_feats), run.world)})
        ref.precompute({"train": run.train_feats, "eval": run.eval_feats}, keys, train.batch_size, pad_id, device)
    pretrained = None
    if cfg.scheduler == "sams" and dist.is_main():
        from unipipe_ray.core.sams_pretrain import pretrained_nets

        pretrained = pretrained_nets(loop_config["model_path"])
        dist.print0(f"dpo: SamS nets {'pretrained during SFT' if pretrained is not None else 'fresh'}")
    selector = PairSelector(cfg, engine.module, train.seed, run.resumed_extra.get("selector", {}), pretrained)
    run.extra_state = lambda: {"selector": selector.state_dict()}
    kept_per_step = selector.kept_per_step(train.batch_size, train.grad_accum)
    evaluate_now = lambda: evaluate(loss, engine.module, ref, run.eval_feats, train.batch_size, pad_id, device, chunk,
                                    train.packing)
    dist.print0(f"dpo: {len(run.train_feats)} train / {len(run.eval_feats)} eval pairs, {run.world} worker(s), "
                f"{run.steps} steps of {run.per_step} pairs ({kept_per_step} trained: scheduler {cfg.scheduler}), "
                f"loss {cfg.loss_type}, beta {cfg.beta}")
    if run.start == 0 and run.eval_feats:
        run.reporter.line(0, evaluate_now())

    metrics = dict(run.metrics)
    for step in range(run.start, run.steps):
        sums, batches, scheduler_metrics = {}, [], {}
        for idx in schedule.pop(step):
            keys = [("train", i) for i in idx]
            batch = {k: v.to(device) for k, v in collate_preference([run.train_feats[i] for i in idx], pad_id).items()}
            # SamS scores the whole micro-batch here, the reference's log-probs included (score_and_remember)
            kept, sched_metrics = selector.keep(engine.module, batch, ref, keys)
            scheduler_metrics.update(sched_metrics)  # rank 0's scheduler; the last micro-batch's round
            # A rank with no kept pair still runs one (zero-weighted) pass: DDP needs every rank's backward.
            weight = 1.0 if kept else 0.0
            kept = kept or [0]
            if len(kept) < len(idx):  # the kept pairs, cut from the collated batch (as collating them would pad)
                keys, batch = [keys[j] for j in kept], select_pairs(batch, kept)
            batches.append(batch)
            # packing: the forward runs without padding; the sums come from the padded layout's log-probs
            policy = pair_logps(engine, batch, loss.average_logps, engine.module, chunk, train.packing)
            # the remembered log-probs when the selector scored this micro-batch, else the reference now
            refs = ref(batch, keys) if loss.needs_reference else None
            losses, chosen_rewards, rejected_rewards = loss(policy, refs)
            # Sum / (global kept pairs / world): DDP's gradient mean is then the mean over the step's kept pairs.
            engine.backward(weight * reduce_loss(losses, mode="example", normalizer=kept_per_step / run.world))
            # Weighted, not skipped: every rank must all-reduce the same metric keys.
            for k, v in pair_metrics("dpo/", losses, chosen_rewards, rejected_rewards, *policy).items():
                sums[k] = sums.get(k, 0) + weight * v
        run.reporter.count_tokens(batches)
        info = engine.step()
        metrics = {**reduce_metrics(sums, kept_per_step), **scheduler_metrics,
                   **run.reporter.step_metrics(info, device, step + 1)}
        loop.end_of_step(run, step + 1, metrics, evaluate_now)
    loop.finish(run, metrics, evaluate_now)


def run_dpo(cfg: DPOConfig, address: str | None = None, inject_failure_at: int | None = None,
            storage: str | None = None, own: tuple | None = None) -> dict:
    """DPO on a Ray cluster (local when no address); return metrics and the checkpoint path.

    ``own``: (train features, eval features, statistics) of pairs sampled from the policy for
    ``pairs: own`` (pipeline/own_pairs.py makes them; ``unipipe dpo`` and the chain pass them here)."""
    from unipipe_ray.core.models import shareable_model

    if (cfg.pairs == "own") != (own is not None):
        raise ValueError("dpo.pairs=own trains on pairs sampled by pipeline/own_pairs.py (pass them as own=...); "
                         "pairs=data reads its own" if own is None else "own pairs given, but dpo.pairs is data")
    ref_path = shareable_model(cfg.ref_model or cfg.model)
    features, stats = (own[:2], {f"dpo/own_{k}": v for k, v in own[2].items()}) if own else (None, None)
    return launch.run_stage("dpo", train_loop, cfg, "preference", address, extra={"ref_path": ref_path},
                            inject_failure_at=inject_failure_at, storage=storage, features=features,
                            extra_metrics=stats)
