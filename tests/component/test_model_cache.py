"""The model cache is built by whichever process of a node gets there first, which inside Ray Train is often a
worker of rank 1. transformers' save_pretrained writes nothing on a process-group rank other than 0; the
cache's builds must write all the same (a node once kept a tokenizer-only "model" and failed on every run)."""

import os
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from unipipe_ray.core import models


def _rank(rank: int, store: str, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if rank == 1:
            config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)
            models._atomic_build(Path(out), lambda tmp: models._save_model_here(LlamaForCausalLM(config), tmp))
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


def test_a_cache_build_on_rank_1_of_a_process_group_writes_the_weights(tmp_path):
    out = tmp_path / "cache" / "model"
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_an_incomplete_cache_entry_is_built_again(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "tokenizer_config.json").write_text("{}")  # what the old rank-1 build left behind

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")

    assert models._atomic_build(target, build) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or stale copies left
    assert os.environ.get("RANK") is None and not torch.distributed.is_initialized()
