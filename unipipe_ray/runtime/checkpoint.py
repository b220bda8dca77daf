"""Models in and out of a stage: load (fresh or from a resume checkpoint, LoRA-wrapped if asked), save
checkpoints that both Hugging Face and an exact resume can use, and restore training state.

A checkpoint directory holds the model in Hugging Face format (safetensors + tokenizer; LoRA adapters
merged), ``lora_adapter/`` when LoRA is on, ``engine/`` (optimizer and schedule, sharded per rank under
DeepSpeed), ``rng_rank{r}.pt`` per rank and ``trainer_state.pt`` (step, metrics). Small state files are
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from unipipe_ray.config import LoraConfig, TrainConfig
from unipipe_ray.core.lora_merge import merge_lora_state
from unipipe_ray.runtime import distributed as dist
from unipipe_ray.runtime.engine import TrainingEngine

STATE_FILE = "trainer_state.pt"
LORA_DIR = "lora_adapter"


def apply_lora(model, lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` in PEFT LoRA adapters when enabled (the base weights are then frozen)."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type=task_type)
    if task_type == "SEQ_CLS":  # the fresh reward head must train too
        peft_cfg.modules_to_save = ["score"]
    return get_peft_model(model, peft_cfg)


def save_and_report(engine: TrainingEngine, step: int, metrics: dict, tokenizer, lora: LoraConfig,
                    extra_state: dict | None = None, staging_dir: str | None = None) -> None:
    """Report metrics with a checkpoint: a Hugging Face model dir (merged LoRA) + what resume needs.

    Every rank writes its own shard of optimizer state (DeepSpeed partitions it) and RNG state; Ray Train
    gathers all ranks' files into one checkpoint directory. The files are written under ``staging_dir``
    (beside the run's output, not in a worker's /tmp, which is often a small tmpfs) before Ray copies them.
    """
    import ray.train

    full = engine.full_state_dict()  # every rank takes part (ZeRO-3 gathers)
    if staging_dir:
        Path(staging_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_dir) as tmp:
        out = Path(tmp)
        engine.save_state(out / "engine")
        torch.save({"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                   out / f"rng_rank{dist.rank()}.pt")
        if dist.is_main():
            _save_hf(engine.module, full, out, tokenizer, lora)
            torch.save({"step": step, "metrics": metrics, "extra": extra_state or {}}, out / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _save_hf(module, full_state: dict, out: Path, tokenizer, lora: LoraConfig) -> None:
    """Everything from the gathered ``full_state`` (the engine's full_state_dict), never from ``module``'s own
    tensors: under ZeRO-3 those are this rank's empty partitions."""
    if lora.enabled:
        from peft import get_peft_model_state_dict

        # adapter only: resume puts it back onto the base
        module.save_pretrained(out / LORA_DIR, state_dict=get_peft_model_state_dict(module, state_dict=full_state))
        module.get_base_model().save_pretrained(out, state_dict=merge_lora_state(full_state, lora.alpha, lora.r))
    else:
        module.save_pretrained(out, state_dict=full_state)
    tokenizer.save_pretrained(out)


def load_trainable(model_path: str, resume: Path | None, train: TrainConfig, kind: str = "causal"):
    """The model to train: from the resume checkpoint if any, else ``model_path``; LoRA-wrapped if asked.

    kind "causal" loads a causal LM, "reward" a sequence classifier with one output (the reward head).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = getattr(torch, train.dtype)
    source = model_path if (resume is None or train.lora.enabled) else str(resume)
    if kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype,
                                                                   use_safetensors=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
    model.config.use_cache = False
    model = apply_lora(model, train.lora, "SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    if resume is not None and train.lora.enabled:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(resume / LORA_DIR / "adapter_model.safetensors"))
    return model


def load_frozen(model_path: str, train: TrainConfig):
    """A model used only for scoring (DPO reference): eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, train.dtype),
                                                 use_safetensors=True)
    return model.eval().requires_grad_(False)


def restore_state(engine: TrainingEngine, resume: Path | None) -> tuple[int, dict, dict]:
    """Optimizer, schedule and RNG state from a resume checkpoint: (step to start from, its metrics, the
    loop's extra state, e.g. the SamS scheduler; rank 0 only)."""
    if resume is None:
        return 0, {}, {}
    engine.load_state(resume / "engine")
    rng = torch.load(resume / f"rng_rank{dist.rank()}.pt", weights_only=True)
    torch.set_rng_state(rng["torch_rng"])
    random.setstate(rng["python_rng"])
    # Only rank 0 wrote the metrics; they stand in for the last step's until new ones come.
    state = torch.load(resume / STATE_FILE, weights_only=True) if (resume / STATE_FILE).exists() else {}
    dist.print0(f"resumed from {resume} at step {rng['step']}")
    return int(rng["step"]), state.get("metrics", {}), state.get("extra", {})
