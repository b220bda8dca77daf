"""Policy weights into vLLM engines over a collective instead of the object store: the GPU-cluster path.

vLLM's documented RLHF pattern (its examples/offline_inference/rlhf.py): the engine's workers load an extension
class (``LLM(worker_extension_cls=...)``) whose methods ``LLM.collective_rpc`` calls; trainer rank 0 and every
engine worker join one ``vllm.distributed.utils.StatelessProcessGroup`` (it does not touch torch.distributed's
global group, which the trainers already use); a ``PyNcclCommunicator`` over that group broadcasts each tensor
from the trainer's GPU to the engines' GPUs, and the workers reload them in place.

    sender = WeightSender(host, port, world_size)            # trainer rank 0 (PolicyTrainer.join_weight_group)
    engine.join_weight_group(host, port, rank, world_size)   # every engine, concurrently with the sender
    specs = weight_specs(state_dict)                         # names, dtypes, shapes: fixed for a run
    sender.send(state_dict) || engine.receive_weights(specs)  # concurrently; then the engine has the new weights

Transport: NCCL when CUDA is available. Without CUDA the same protocol runs over a gloo group built on the
group's store, and each tensor travels as its raw bytes, checked against the spec's size: nothing received
is unpickled (the store's own ``broadcast_obj`` pickles, and an engine must not run whatever arrives). On CPU
the object-store path, ``weight_sync: object_store``, is the faster one; this path tests the protocol.
"""

from __future__ import annotations

import datetime

import torch

GLOO_TIMEOUT = datetime.timedelta(minutes=10)


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as a flat uint8 tensor (any dtype, bf16 included: gloo need not support it)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def from_bytes(raw: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``to_bytes`` for a tensor of ``dtype`` and ``shape``; refuses a buffer of the wrong size."""
    tp = getattr(torch, dtype, None)
    if not isinstance(tp, torch.dtype):
        raise ValueError(f"weight sync: unknown dtype {dtype!r}")
    expected = torch.Size(shape).numel() * tp.itemsize
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        raise ValueError(f"weight sync: got {raw.numel()} bytes for a {dtype} tensor of shape {tuple(shape)} "
                         f"({expected} expected)")
    return raw.view(tp).reshape(shape)


def weight_specs(state_dict: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype name, shape) per tensor, in the order the sender broadcasts them."""
    return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in state_dict.items()]


class _Channel:
    def __init__(self, host: str, port: int, rank: int, world_size: int, device):
        from vllm.distributed.utils import StatelessProcessGroup

        self.group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.device = torch.device(device)
        self.nccl = self.gloo = None
        if self.device.type == "cuda":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

            self.nccl = PyNcclCommunicator(self.group, device=self.device)
        else:
            from torch.distributed import PrefixStore, ProcessGroupGloo

            # Its own prefix: the group's store also carries vLLM's keys.
            self.gloo = ProcessGroupGloo(PrefixStore("unipipe-weights", self.group.store), rank, world_size,
                                         GLOO_TIMEOUT)

    def _gloo_broadcast(self, buffer: torch.Tensor) -> None:
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        self.gloo.broadcast([buffer], opts).wait()

    def send(self, tensors) -> None:
        for t in tensors:
            if self.nccl is not None:
                self.nccl.broadcast(t.to(self.device).contiguous(), src=0, stream=torch.cuda.current_stream())
            else:
                self._gloo_broadcast(to_bytes(t))
        if self.nccl is not None:
            torch.cuda.current_stream().synchronize()

    def receive(self, specs) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, dtype, shape in specs:
            if self.nccl is not None:
                buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self.nccl.broadcast(buffer, src=0, stream=torch.cuda.current_stream())
            else:
                size = torch.Size(shape).numel() * getattr(torch, dtype).itemsize
                raw = torch.empty(size, dtype=torch.uint8)
                self._gloo_broadcast(raw)
                buffer = from_bytes(raw, dtype, shape)
            out.append((name, buffer))
        if self.nccl is not None:
            torch.cuda.current_stream().synchronize()
        return out


class WeightSender:
    """The trainer's end (rank 0 of the weight group)."""

    def __init__(self, host: str, port: int, world_size: int, device="cpu"):
        self.channel = _Channel(host, port, 0, world_size, device)

    def send(self, state_dict: dict) -> None:
        self.channel.send(state_dict.values())


class WeightReceiver:
    """vLLM worker extension: mixed into every engine worker; ``LLM.collective_rpc`` calls these methods."""

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        # one rank per engine worker: rank_offset + this worker's rank inside its engine (tensor parallel)
        device = getattr(self, "device", None) or "cpu"
        self._weight_channel = _Channel(host, port, rank_offset + self.rank, world_size, device)

    def receive_weights(self, specs) -> None:
        weights = self._weight_channel.receive(specs)
        # reload_weights repacks in place (plain load_weights fails on CPU, whose weights are prepacked for oneDNN)
        self.model_runner.reload_weights(weights_iterator=weights)
