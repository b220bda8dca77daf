"""The process group: rank and world size, reductions and gathers, joining and tearing down a group.

Ray Train starts the process group (gloo on CPU, NCCL on GPU) before a stage's loop runs; PPO's actor groups
join their own (``init_group``). With no group everything reads as one process, so the loops are the same on
one process or many. The training engine on top of it is engine.py; this module and that one are the only
ones that touch torch.distributed and DeepSpeed.
"""

from __future__ import annotations

import gc
import os
import socket
import sys

import torch
import torch.distributed as dist

from unipipe_ray.runtime.logs import progress


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def print0(message: str) -> None:
    """A progress line (logs.progress) on rank 0 only: Ray forwards worker stdout to the driver, so this is
    the live log."""
    if is_main():
        progress(message)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where the group's collectives run: NCCL only takes CUDA tensors (this rank's current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(value: float | torch.Tensor) -> torch.Tensor:
    """Sum a scalar or tensor over ranks (a float64 copy on the input's device; the input is untouched)."""
    t = torch.as_tensor(value, dtype=torch.float64).clone()
    if world_size() > 1:
        on = t.to(_comm_device(t))
        dist.all_reduce(on, op=dist.ReduceOp.SUM)
        t = on.to(t.device)
    return t


def all_reduce_mean(value: float | torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(value) / world_size()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, master_addr: str, master_port: int) -> None:
    """Join a process group outside Ray Train (PPO's actor groups): NCCL on GPU, gloo on CPU."""
    if world <= 1 or dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK="0")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)


def shutdown() -> None:
    """Tear down the process group this process started (and DeepSpeed's hold on it) while Python is alive.

    ``torch.distributed.destroy_process_group`` alone is not enough once DeepSpeed ran: DeepSpeed keeps its
    own reference to the world group, so the gloo backend and its worker threads survive into interpreter
    finalization, where tearing them down can abort the process (``terminate called without an active
    exception``). DeepSpeed's own destroy_process_group destroys torch's group and drops its references.
    The barrier first keeps rank 0, which hosts the rendezvous store, from leaving while a peer still talks.
    Call it only where this process created the group (not inside Ray Train, which owns its group).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if world_size() > 1:
        dist.barrier()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    gc.collect()



def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0, in rank order."""
    if world_size() == 1:
        return tensor
    on = tensor.to(_comm_device(tensor)).contiguous()
    parts = [torch.empty_like(on) for _ in range(world_size())]
    dist.all_gather(parts, on)
    return torch.cat(parts).to(tensor.device)


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (same shape and dtype everywhere)."""
    if world_size() > 1:
        on = tensor.to(_comm_device(tensor))
        dist.broadcast(on, src=0)
        if on is not tensor:
            tensor.copy_(on)
    return tensor
