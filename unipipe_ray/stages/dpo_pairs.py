"""DPO's pieces, one class per decision, so that the stage loop (stages/dpo.py) reads top to bottom:

    PairLoss      the configured loss (sigmoid DPO, IPO, cDPO smoothing, SimPO) and what it needs
    RefScorer     the reference's log-probs: a frozen model, or a table filled once up front
    PairSelector  which pairs of each micro-batch train: all, a seeded random keep-k, or SamS

A preference batch is one forward of 2B rows (the B chosen, then the B rejected; ``data.collate_preference``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unipipe_ray.config import DPOConfig, chunk_size
from unipipe_ray.core.forward import sequence_pair_logps
from unipipe_ray.core.logps import sequence_logps
from unipipe_ray.core.losses import dpo_loss, simpo_loss
from unipipe_ray.core.sams_nets import arm_forward
from unipipe_ray.runtime import distributed as dist


def pair_logps(model, batch: dict, average: bool = False, module=None, chunk_size: int | None = None,
               packing: bool = False):
    """Sequence log-probs of a (2B, T) preference batch -> (chosen (B,), rejected (B,)); with a chunk size the
    LM head runs in chunks over the target tokens only, with packing the forward runs without padding
    (``core.forward``)."""
    return sequence_pair_logps(model, module if module is not None else model, batch, chunk_size, average, packing)


@dataclass(frozen=True)
class PairLoss:
    """The configured preference loss. SimPO is the one member without a reference: it scores the policy's
    length-normalised (mean per token) log-probs; the DPO family compares summed log-probs with the
    reference's. Called with (policy (chosen, rejected), reference (chosen, rejected) or None), it returns
    (losses, chosen_rewards, rejected_rewards), each (B,)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    @classmethod
    def of(cls, cfg: DPOConfig) -> PairLoss:
        return cls(cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"

    @property
    def average_logps(self) -> bool:
        """Whether the policy's log-probs are per-token means (SimPO's length normalisation) or sums."""
        return not self.needs_reference

    def __call__(self, policy: tuple, ref: tuple | None = None) -> tuple:
        if not self.needs_reference:
            return simpo_loss(*policy, beta=self.beta, gamma=self.simpo_gamma)
        return dpo_loss(*policy, *ref, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing)


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
    table filled once up front (then the model is dropped and its memory returns).

    A step that scores a whole micro-batch before it knows which pairs train (SamS) calls
    ``score_and_remember``; calling the scorer on the kept pairs afterwards reads their log-probs back
    instead of running the reference again. Only the last remembered micro-batch is held. ``packing``: its
    forward runs on the packed sequences, as the policy's does (``train.packing``)."""

    def __init__(self, model, chunk_size: int | None = None, packing: bool = False):
        self.model, self.table, self.chunk_size, self.packing = model, None, chunk_size, packing
        self.memo: dict = {}  # the last score_and_remember's log-probs by key

    @torch.no_grad()
    def score_and_remember(self, batch: dict, keys: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's reference log-probs, held by key for a later call on a subset of its pairs."""
        chosen, rejected = self(batch, keys)
        if self.table is None:
            self.memo = dict(zip(keys, zip(chosen.tolist(), rejected.tolist(), strict=True), strict=True))
        return chosen, rejected

    @torch.no_grad()
    def precompute(self, features: dict[str, list], keys: list[tuple[str, int]], batch_size: int, pad_id: int,
                   device) -> None:
        from unipipe_ray.data import collate_preference

        self.table = {}
        for i in range(0, len(keys), batch_size):
            chunk = keys[i:i + batch_size]
            batch = collate_preference([features[split][j] for split, j in chunk], pad_id)
            chosen, rejected = pair_logps(self.model, {k: v.to(device) for k, v in batch.items()},
                                          chunk_size=self.chunk_size, packing=self.packing)
            self.table.update(zip(chunk, zip(chosen.tolist(), rejected.tolist(), strict=True), strict=True))
        self.model = None

    @torch.no_grad()
    def __call__(self, batch: dict, keys: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """From the precomputed table or the remembered micro-batch when they hold every key, else the model."""
        table = self.table if self.table is not None else self.memo
        if not all(k in table for k in keys):
            return pair_logps(self.model, batch, chunk_size=self.chunk_size, packing=self.packing)
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

    def keep(self, module, batch: dict, ref: RefScorer, keys) -> tuple[list[int], dict]:
        """Local indices of the kept pairs of this micro-batch, and the scheduler's metrics. SamS scores the
        whole micro-batch, the reference included (``ref.score_and_remember``)."""
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
        core.sams_nets.arm_forward): arm features, and the policy's view of each pair (beta * h, chosen log-prob)
        for SamS's rewards. The reference's log-probs are remembered: the kept pairs' step reads them back."""
        pooled, logps, mask = arm_forward(module, batch, no_grad_chunk(self.chunk))
        n = batch["input_ids"].shape[0] // 2
        features = 0.5 * (pooled[:n] + pooled[n:])  # chosen and rejected averaged (paper)
        chosen, rejected = sequence_logps(logps, mask).chunk(2)
        ref_chosen, ref_rejected = ref.score_and_remember(batch, keys)
        margins = self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        return features.float().cpu(), margins.float().cpu(), chosen.float().cpu()
