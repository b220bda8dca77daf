"""The SFT stage end to end on a local Ray cluster: 2 workers over gloo, tiny model, real tokenizer."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from unipipe_ray.config import SFTConfig, load_config
from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.stages.sft import run_sft

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def test_sft_two_workers_loss_falls_and_checkpoint_loads(ray_cluster, tmp_path):
    cfg = load_config(SFTConfig, overrides=[
        "model=tiny", f"output_dir={tmp_path}", "data.task_size=40", "data.eval_size=8",
        "data.max_length=96", "train.num_workers=2", "train.batch_size=2", "train.max_steps=8",
        "train.lr=3e-3", "train.warmup_ratio=0", "train.checkpoint_minutes=1e-6"])
    result = run_sft(cfg)
    # checkpoint_minutes (tiny here) saved after steps 1-7 besides the final save; Ray Train keeps the last 2
    assert len([p for p in (tmp_path / "sft").glob("checkpoint_*") if p.is_dir()]) == 2
    m = result["metrics"]
    assert m["step"] == 8 and m["sft/eval_loss"] < 10.0  # random init starts at ln(49152) = 10.8
    # 8 steps x 2 rows x 2 workers is one epoch of the 32 training rows: each worker turned its 16 rows (its
    # micro-batches) into Python from the memory-mapped cache, not the 32 of the whole set.
    assert result["train_examples"] == 32 and result["data"]["rows"] == 40 and not result["data"]["reused"]
    assert (m["data/rows_read_min"], m["data/rows_read_max"]) == (16, 16)
    assert json.loads((tmp_path / "result.json").read_text())["checkpoint"] == result["checkpoint"]
    # The checkpoint is a plain Hugging Face directory: transformers loads it with no project code.
    model = AutoModelForCausalLM.from_pretrained(result["checkpoint"], use_safetensors=True)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters(), strict=True)]
    assert all(changed), "every trainable parameter changes after training"


def test_a_nan_stops_the_stage_at_its_step_and_keeps_the_last_checkpoint(ray_cluster, tmp_path):
    """A weight turned NaN before step 3 (2 workers, checkpoints every 2 steps): the stage stops at step 3
    with an error naming it (not a retry from checkpoint 2: it would meet the same NaN), writes no result
    and keeps checkpoint 2 whole."""
    from unipipe_ray.runtime.loop import NonFiniteLoss

    cfg = load_config(SFTConfig, overrides=[
        "model=tiny", f"output_dir={tmp_path}", "data.task_size=40", "data.eval_size=8",
        "data.max_length=96", "train.num_workers=2", "train.batch_size=2", "train.max_steps=6",
        "train.checkpoint_every=2", "train.max_failures=2"])
    with pytest.raises(NonFiniteLoss, match=r"sft: non-finite sft/loss=nan.* at step 3; stopped") as e:
        run_sft(cfg, inject_nan_at=3)
    kept = Path(str(e.value).split("Last good checkpoint: ")[1])
    assert torch.load(kept / "trainer_state.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "result.json").exists()
    model = AutoModelForCausalLM.from_pretrained(kept, use_safetensors=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # checkpoint files were staged beside the output (and cleaned up), not in the workers' /tmp
    assert (tmp_path / ".staging").is_dir() and not any((tmp_path / ".staging").iterdir())
