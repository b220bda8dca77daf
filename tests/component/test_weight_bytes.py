"""The CPU weight-sync transport: raw tensor bytes over a gloo group on the weight group's store, nothing
unpickled; a buffer of the wrong size is refused. Two real processes, vLLM's StatelessProcessGroup."""

import multiprocessing as mp
import socket

import pytest
import torch

from unipipe_ray.ppo.weight_sync import from_bytes, to_bytes, weight_specs


def test_bytes_round_trip_every_dtype_and_refuse_a_wrong_size():
    for t in (torch.randn(3, 5), torch.randn(4, 2).to(torch.bfloat16), torch.arange(6).reshape(2, 3),
              torch.randn(7).to(torch.float16)):
        back = from_bytes(to_bytes(t).clone(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
        assert back.dtype == t.dtype and torch.equal(back, t)
    with pytest.raises(ValueError, match="got 60 bytes for a float32 tensor of shape \\(4, 4\\)"):
        from_bytes(to_bytes(torch.randn(3, 5)), "float32", (4, 4))
    with pytest.raises(ValueError, match="unknown dtype"):
        from_bytes(to_bytes(torch.randn(2)), "Tensor", (2,))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(32, generator=g).to(torch.bfloat16),
            "c.scale": torch.randn(1, generator=g)}


def _sender(port, world, rounds):
    from unipipe_ray.ppo.weight_sync import WeightSender

    sender = WeightSender("127.0.0.1", port, world)
    for r in range(rounds):
        sender.send({k: v + r for k, v in _state().items()})


def _receiver(port, rank, world, rounds, queue):
    from unipipe_ray.ppo.weight_sync import _Channel

    channel = _Channel("127.0.0.1", port, rank, world, "cpu")
    specs = weight_specs(_state())
    for r in range(rounds):
        got = dict(channel.receive(specs))
        queue.put(all(torch.equal(got[k], v + r) for k, v in _state().items()))


@pytest.mark.timeout(120)
def test_two_engines_receive_every_round_bit_for_bit():
    ctx = mp.get_context("spawn")
    port, world, rounds = _free_port(), 3, 3
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(port, world, rounds))]
    procs += [ctx.Process(target=_receiver, args=(port, rank, world, rounds, queue)) for rank in (1, 2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=100) for _ in range((world - 1) * rounds)]
    for p in procs:
        p.join(timeout=30)
    assert results == [True] * 6 and all(p.exitcode == 0 for p in procs)
