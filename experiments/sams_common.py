"""Shared pieces of the SamS experiments (sams_cost.py, sams_repro.py): the DPO stage's own step, run in-process.

`DpoLearner.step` is `stages.dpo.train_loop`'s inner loop for one micro-batch at world size 1 (PairSelector picks
the pairs: none / random / sams; kept pairs only run forward + backward), without Ray, so a study times the
step itself and not Ray Train's fixed overhead. Peak memory is the process's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs): a CPU has no allocator counter like torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from unipipe_ray.config import DPOConfig, TrainConfig
from unipipe_ray.core.losses import reduce_loss
from unipipe_ray.core.sams import SamsSettings
from unipipe_ray.data import collate_preference, select_pairs
from unipipe_ray.stages.dpo_pairs import PairLoss, PairSelector, RefScorer, no_grad_chunk, pair_logps

HH_PATH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless/test.jsonl.gz"


def status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> int:
    """Reset the resident-set high-water mark (Linux >= 4.0); returns the current RSS in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS")


def peak_kb() -> int:
    return status_kb("VmHWM")


def load_model(path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def dpo_config(arm: str, keep_ratio: float, beta: float, chunk: int | None, sams: dict | None = None) -> DPOConfig:
    """arm: none | random | sams | sams_noexplore (the paper's "without f_S'" ablation)."""
    settings = SamsSettings(**{**(sams or {}), **({"explore": False} if arm == "sams_noexplore" else {})})
    scheduler = "sams" if arm.startswith("sams") else arm
    return DPOConfig(beta=beta, scheduler=scheduler, keep_ratio=keep_ratio, sams=settings,
                     train=TrainConfig(logps_chunk_size=chunk or 0))


class DpoLearner:
    """Policy + frozen reference + AdamW + the stage's PairSelector; step(features) is one DPO step."""

    def __init__(self, policy, ref, cfg: DPOConfig, pad_id: int, lr: float, seed: int, weight_decay: float = 0.0):
        self.policy, self.cfg, self.pad_id = policy.train(), cfg, pad_id
        self.chunk = cfg.train.logps_chunk_size or None
        self.ref = RefScorer(ref.eval().requires_grad_(False), no_grad_chunk(self.chunk))  # as the stage does
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr,
                                     weight_decay=weight_decay)
        self.selector = PairSelector(cfg, policy, seed, {})

    def step(self, feats: list[dict], keys: list) -> dict:
        """One optimizer step on one micro-batch. Returns the step's time and the kept pairs' metrics."""
        start = time.perf_counter()
        batch = collate_preference(feats, self.pad_id)
        kept, sched_metrics = self.selector.keep(self.policy, batch, self.ref, keys)
        if len(kept) < len(feats):
            keys, batch = [keys[j] for j in kept], select_pairs(batch, kept)
        policy = pair_logps(self.policy, batch, False, self.policy, self.chunk)
        losses, chosen_rewards, rejected_rewards = PairLoss.of(self.cfg)(policy, self.ref(batch, keys))
        reduce_loss(losses, mode="example").backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"time_s": time.perf_counter() - start, "loss": losses.mean().item(), "kept": len(kept),
                "kept_indices": kept, "rewards_chosen": chosen_rewards.mean().item(), **sched_metrics}


@torch.no_grad()
def preference_accuracy(policy, ref, feats: list[dict], pad_id: int, beta: float, chunk: int | None,
                        batch_size: int = 16) -> dict:
    """Share of pairs whose implicit reward beta * (log pi - log pi_ref) ranks the chosen response higher, and
    the mean chosen reward; per-pair correctness for intervals."""
    policy.eval()
    correct, chosen_rewards = [], []
    for i in range(0, len(feats), batch_size):
        batch = collate_preference(feats[i:i + batch_size], pad_id)
        chosen, rejected = pair_logps(policy, batch, chunk_size=chunk)
        ref_chosen, ref_rejected = pair_logps(ref, batch, chunk_size=chunk)
        r_chosen, r_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        correct += (r_chosen > r_rejected).tolist()
        chosen_rewards += r_chosen.tolist()
    policy.train()
    return {"accuracy": sum(correct) / len(correct), "rewards_chosen": sum(chosen_rewards) / len(chosen_rewards),
            "correct": correct}


def flip(feats: list[dict], share: float, seed: int) -> tuple[list[dict], set]:
    """Swap chosen and rejected of a seeded `share` of the pairs (label noise). Returns (pairs, flipped ids)."""
    g = torch.Generator().manual_seed(seed)
    flipped = set(torch.randperm(len(feats), generator=g)[:round(share * len(feats))].tolist())
    out = []
    for i, f in enumerate(feats):
        if i in flipped:
            f = {**f, **{k.replace("chosen", "@").replace("rejected", "chosen").replace("@", "rejected"): v
                         for k, v in f.items() if "chosen" in k or "rejected" in k}}
        out.append(f)
    return out, flipped
