"""The one module that touches torch.distributed (and, with the GPU stages, DeepSpeed).

Ray Train starts the process group (gloo on CPU, NCCL on GPU) before a stage's loop runs; this facade reads
rank and world size from it, wraps the model for data parallelism, and owns backward/step/all-reduce, so the
stage loops read the same whether they run on one process or many.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def print0(message: str) -> None:
    """Print on rank 0 only: Ray forwards worker stdout to the driver, so this is the live log.

    Writes to the stream directly because Ray Train patches print() into a logger that echoes twice.
    """
    if is_main():
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


def all_reduce_sum(value: float | torch.Tensor) -> torch.Tensor:
    """Sum a scalar or tensor over ranks (a copy; the input is untouched)."""
    t = torch.as_tensor(value, dtype=torch.float64).clone()
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(value: float | torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(value) / world_size()


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warmup from 0 to 1 over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases and norm weights (1-D tensors), the usual AdamW practice.
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Engine:
    """Model + AdamW + warmup/cosine schedule + clipping, data-parallel over the current process group.

    ``backward(loss)`` accumulates; ``step()`` clips, steps, advances the schedule and zeroes gradients.
    Gradients are averaged over ranks by DDP, so losses must be normalised with the global token count
    divided by the world size (see ``losses.reduce_loss``).
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, max_grad_norm: float,
                 total_steps: int, warmup_steps: int):
        self.module = model
        self.model = model
        if world_size() > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
        self.optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps))
        self.max_grad_norm = max_grad_norm

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict:
        """One optimizer step; returns the pre-clip gradient norm and the LR used."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, "lr": lr}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
