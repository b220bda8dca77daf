"""DPO stage (and its family: IPO, cDPO label smoothing, SimPO), run by Ray Train on N workers.

A preference batch is one forward of 2B rows (the B chosen, then the B rejected; see
``data.collate_preference``). The reference is the stage's input model unless ``ref_model`` is set;
with ``precompute_ref_logps`` it scores every pair once up front and is then freed.
"""

from __future__ import annotations

import torch

from unipipe_ray.config import DPOConfig, chunk_size
from unipipe_ray.core.forward import sequence_pair_logps
from unipipe_ray.core.logps import sequence_logps
from unipipe_ray.core.losses import dpo_loss, reduce_loss, simpo_loss
from unipipe_ray.core.sams_nets import arm_forward
from unipipe_ray.runtime import checkpoint, launch, loop
from unipipe_ray.runtime import distributed as dist


def pair_logps(model, batch: dict, average: bool = False, module=None, chunk_size: int | None = None):
    """Sequence log-probs of a (2B, T) preference batch -> (chosen (B,), rejected (B,)); with a chunk size the
    LM head runs in chunks over the target tokens only (``stages.forward``)."""
    return sequence_pair_logps(model, module if module is not None else model, batch, chunk_size, average)


def pair_losses(cfg: DPOConfig, policy: tuple, ref: tuple | None) -> tuple:
    """(losses, chosen_rewards, rejected_rewards), each (B,), for the configured loss."""
    if cfg.loss_type == "simpo":
        return simpo_loss(*policy, beta=cfg.beta, gamma=cfg.simpo_gamma)
    return dpo_loss(*policy, *ref, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)


def pair_metrics(prefix: str, losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """Sums over this rank's pairs (divided by the global count by the caller)."""
    return {f"{prefix}loss": losses.detach().sum(), f"{prefix}rewards_chosen": chosen_rewards.sum(),
            f"{prefix}rewards_rejected": rejected_rewards.sum(),
            f"{prefix}rewards_accuracy": (chosen_rewards > rejected_rewards).float().sum(),
            f"{prefix}rewards_margin": (chosen_rewards - rejected_rewards).sum(),
            f"{prefix}logps_chosen": chosen_logps.detach().sum(),
            f"{prefix}logps_rejected": rejected_logps.detach().sum()}


def reduce_metrics(sums: dict, count: float) -> dict:
    return {k: float(dist.all_reduce_sum(v.detach().double().cpu())) / count for k, v in sums.items()}


def no_grad_chunk(chunk: int | None) -> int | None:
    """LM-head chunk of the no-grad passes (reference, SamS scoring): a quarter of the training chunk. Measured on
    the tiny model (16 pairs, 1,186 target tokens, chunk 1024): a no-grad pass peaked at 384 MB, above the
    training pass (312 MB), so it set the step's peak; at 256 it took 96 MB. No backward: little time lost."""
    return chunk and max(1, chunk // 4)


class RefScorer:
    """Reference log-probs of pairs keyed ("train" | "eval", index): a frozen model under no_grad, or a
    table filled once up front (then the model is dropped and its memory returns)."""

    def __init__(self, model, chunk_size: int | None = None):
        self.model, self.table, self.chunk_size = model, None, chunk_size
        self.memo: dict = {}  # the last remembered batch's log-probs by key

    def remember(self, keys: list, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Hold a scored batch so that a sub-batch of it (SamS's kept pairs) is not scored again."""
        if self.table is None:
            self.memo = dict(zip(keys, zip(chosen.tolist(), rejected.tolist(), strict=True), strict=True))

    @torch.no_grad()
    def precompute(self, features: dict[str, list], keys: list[tuple[str, int]], batch_size: int, pad_id: int,
                   device) -> None:
        from unipipe_ray.data import collate_preference

        self.table = {}
        for i in range(0, len(keys), batch_size):
            chunk = keys[i:i + batch_size]
            batch = collate_preference([features[split][j] for split, j in chunk], pad_id)
            chosen, rejected = pair_logps(self.model, {k: v.to(device) for k, v in batch.items()},
                                          chunk_size=self.chunk_size)
            self.table.update(zip(chunk, zip(chosen.tolist(), rejected.tolist(), strict=True), strict=True))
        self.model = None

    @torch.no_grad()
    def __call__(self, batch: dict, keys: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.table if self.table is not None else self.memo
        if not all(k in table for k in keys):
            return pair_logps(self.model, batch, chunk_size=self.chunk_size)
        pairs = torch.tensor([table[k] for k in keys], dtype=torch.float32, device=batch["input_ids"].device)
        return pairs[:, 0], pairs[:, 1]


class PairSelector:
    """Which pairs of each micro-batch train: all (plain DPO), a seeded random keep-k ("DPO random 50%"), or
    SamS. The selection is over the global micro-batch: rank 0 owns the RNG / scheduler and broadcasts the
    kept global indices, so every rank trains on its own kept pairs and the data-parallel step stays exact."""

    def __init__(self, cfg: DPOConfig, model, seed: int, resumed: dict, pretrained: dict | None = None):
        from unipipe_ray.core.sams import SamsScheduler

        self.kind, self.ratio, self.beta, self.chunk = cfg.scheduler, cfg.keep_ratio, cfg.beta, chunk_size(cfg.train)
        self.generator = torch.Generator().manual_seed(seed)
        self.sched = None
        if self.kind == "sams" and dist.is_main():
            self.sched = SamsScheduler(model.config.hidden_size, model.config.num_hidden_layers, cfg.sams, seed=seed)
        if resumed:
            self.generator.set_state(resumed["generator"])
            if self.sched is not None:
                self.sched.load_state_dict(resumed["sams"])
        elif self.sched is not None and pretrained is not None:  # nets pretrained during SFT (sams_pretrain)
            self.sched.load_nets(pretrained)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(),
                **({"sams": self.sched.state_dict()} if self.sched is not None else {})}

    def kept_per_step(self, n_local: int, grad_accum: int) -> int:
        """Pairs trained per optimizer step over all ranks (the loss normaliser)."""
        n_global = n_local * dist.world_size()
        return grad_accum * (n_global if self.kind == "none" else max(1, round(self.ratio * n_global)))

    def keep(self, module, batch: dict, ref, keys, device) -> tuple[list[int], dict]:
        """Local indices of the kept pairs of this micro-batch, and the scheduler's metrics."""
        n = batch["input_ids"].shape[0] // 2
        if self.kind == "none":
            return list(range(n)), {}
        n_global = n * dist.world_size()
        k = max(1, round(self.ratio * n_global))
        metrics: dict = {}
        if self.kind == "random":
            keep = torch.randperm(n_global, generator=self.generator)[:k].sort().values if dist.is_main() \
                else torch.zeros(k, dtype=torch.long)
        else:
            features, margins, chosen_logps = self._arm_inputs(module, batch, ref, keys)
            features, margins = dist.all_gather_cat(features), dist.all_gather_cat(margins)
            chosen_logps = dist.all_gather_cat(chosen_logps)
            keep = torch.zeros(k, dtype=torch.long)
            if self.sched is not None:
                keep, metrics = self.sched.step(features, margins, chosen_logps, k)
        keep = dist.broadcast_from_main(keep.to(torch.long).contiguous())
        lo = dist.rank() * n
        return [int(g) - lo for g in keep.tolist() if lo <= g < lo + n], metrics

    @torch.no_grad()
    def _arm_inputs(self, module, batch, ref, keys):
        """One no-grad forward of the whole micro-batch (LM head chunked, blocks pooled on the fly: see
        sams_nets.arm_forward): arm features, and the policy's view of each pair (beta * h, chosen log-prob)
        for SamS's rewards. The reference's log-probs are remembered for the kept pairs' step."""
        pooled, logps, mask = arm_forward(module, batch, no_grad_chunk(self.chunk))
        n = batch["input_ids"].shape[0] // 2
        features = 0.5 * (pooled[:n] + pooled[n:])  # chosen and rejected averaged (paper)
        chosen, rejected = sequence_logps(logps, mask).chunk(2)
        ref_chosen, ref_rejected = ref(batch, keys)
        ref.remember(keys, ref_chosen, ref_rejected)
        margins = self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        return features.float().cpu(), margins.float().cpu(), chosen.float().cpu()


@torch.no_grad()
def evaluate(cfg: DPOConfig, model, ref: RefScorer, features: list[dict], batch_size: int, pad_id: int,
             device) -> dict:
    """DPO metrics on the held-out pairs (rank r takes every world-th pair), reduced over ranks."""
    from unipipe_ray.data import collate_preference

    model.eval()
    sums: dict = {}
    indices = list(range(dist.rank(), len(features), dist.world_size()))
    for i in range(0, len(indices), batch_size):
        idx = indices[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate_preference([features[j] for j in idx], pad_id).items()}
        policy = pair_logps(model, batch, cfg.loss_type == "simpo", chunk_size=chunk_size(cfg.train))
        refs = None if cfg.loss_type == "simpo" else ref(batch, [("eval", j) for j in idx])
        for k, v in pair_metrics("dpo/eval_", *pair_losses(cfg, policy, refs), *policy).items():
            sums[k] = sums.get(k, 0) + v
    model.train()
    return reduce_metrics(sums, len(features))


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    from unipipe_ray.data import collate_preference

    run = loop.start_run("dpo", loop_config)
    cfg, train, engine, device, pad_id = run.cfg, run.train, run.engine, run.device, run.pad_id
    chunk = chunk_size(train)
    ref = RefScorer(None if cfg.loss_type == "simpo" else  # SimPO has no reference
                    checkpoint.load_frozen(loop_config["ref_path"], train).to(device), no_grad_chunk(chunk))
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
    evaluate_now = lambda: evaluate(cfg, engine.module, ref, run.eval_feats, train.batch_size, pad_id, device)
    dist.print0(f"dpo: {len(run.train_feats)} train / {len(run.eval_feats)} eval pairs, {run.world} worker(s), "
                f"{run.steps} steps of {run.per_step} pairs ({kept_per_step} trained: scheduler {cfg.scheduler}), "
                f"loss {cfg.loss_type}, beta {cfg.beta}")
    if run.start == 0 and run.eval_feats:
        run.reporter.line(0, evaluate_now())

    metrics = dict(run.metrics)
    for step in range(run.start, run.steps):
        sums, batches, scheduler_metrics = {}, [], {}
        for idx in schedule.pop(step):
            full = [run.train_feats[i] for i in idx]
            keys = [("train", i) for i in idx]
            batch = {k: v.to(device) for k, v in collate_preference(full, pad_id).items()}
            kept, sched_metrics = selector.keep(engine.module, batch, ref, keys, device)
            scheduler_metrics.update(sched_metrics)  # rank 0's scheduler; the last micro-batch's round
            # A rank with no kept pair still runs one (zero-weighted) pass: DDP needs every rank's backward.
            weight = 1.0 if kept else 0.0
            kept = kept or [0]
            if len(kept) < len(idx):
                keys = [keys[j] for j in kept]
                batch = {k: v.to(device) for k, v in collate_preference([full[j] for j in kept], pad_id).items()}
            batches.append(batch)
            policy = pair_logps(engine, batch, cfg.loss_type == "simpo", engine.module, chunk)
            refs = None if cfg.loss_type == "simpo" else ref(batch, keys)
            losses, chosen_rewards, rejected_rewards = pair_losses(cfg, policy, refs)
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


def run_dpo(cfg: DPOConfig, address: str | None = None, inject_failure_at: int | None = None) -> dict:
    """DPO on a Ray cluster (local when no address); return metrics and the checkpoint path."""
    from unipipe_ray.core.models import resolve_model

    ref_path = resolve_model(cfg.ref_model or cfg.model)
    return launch.run_stage("dpo", train_loop, cfg, "preference", address, extra={"ref_path": ref_path},
                            inject_failure_at=inject_failure_at)
