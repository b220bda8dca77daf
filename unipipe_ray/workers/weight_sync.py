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

Transport: NCCL when CUDA is available. Without CUDA the same protocol runs over the group's TCP store
(``broadcast_obj``, pickled tensors: slow, for testing the protocol with the CPU build of vLLM; on CPU the
object-store path, ``weight_sync: object_store``, is the one to use).
"""

from __future__ import annotations

import torch


def weight_specs(state_dict: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype name, shape) per tensor, in the order the sender broadcasts them."""
    return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in state_dict.items()]


class _Channel:
    def __init__(self, host: str, port: int, rank: int, world_size: int, device):
        from vllm.distributed.utils import StatelessProcessGroup

        self.group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.device = torch.device(device)
        self.nccl = None
        if self.device.type == "cuda":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

            self.nccl = PyNcclCommunicator(self.group, device=self.device)

    def send(self, tensors) -> None:
        for t in tensors:
            if self.nccl is not None:
                self.nccl.broadcast(t.to(self.device).contiguous(), src=0, stream=torch.cuda.current_stream())
            else:
                self.group.broadcast_obj(t.detach().cpu(), src=0)
        if self.nccl is not None:
            torch.cuda.current_stream().synchronize()

    def receive(self, specs) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, dtype, shape in specs:
            if self.nccl is not None:
                buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self.nccl.broadcast(buffer, src=0, stream=torch.cuda.current_stream())
            else:
                buffer = self.group.broadcast_obj(None, src=0)
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
