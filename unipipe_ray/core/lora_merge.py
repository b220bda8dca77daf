"""LoRA adapters folded into the base weights from a full state dict: W' = W + (alpha / r) * B @ A.

Why not PEFT's ``merge_and_unload``: it merges the module it is given, and under ZeRO-3 that module holds
only this rank's empty partitions. The training engine gathers the full state dict (every rank takes part),
so the merge works on that dict instead, on rank 0, the same way for DDP and every ZeRO stage.

PEFT's key layout (adapter "default"):
    base_model.model.<path>.base_layer.weight       the frozen base weight of an adapted linear layer
    base_model.model.<path>.lora_A.default.weight   A (r, in)
    base_model.model.<path>.lora_B.default.weight   B (out, r)
    base_model.model.<path>.modules_to_save.default.<name>   a fully trained copy (a reward head)
    base_model.model.<path>.original_module.<name>           the untouched original of that copy
"""

from __future__ import annotations

import torch

PREFIX = "base_model.model."


def merge_lora_state(state: dict[str, torch.Tensor], alpha: float, r: int,
                     adapter: str = "default") -> dict[str, torch.Tensor]:
    """The plain model's state dict (the keys ``save_pretrained`` of the base model writes) with every LoRA
    pair merged into its base weight and every trained module copy in place of its original."""
    scale = alpha / r
    out: dict[str, torch.Tensor] = {}
    lora_a, lora_b = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    for key, value in state.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"not a PEFT state dict: key {key!r} lacks the {PREFIX!r} prefix")
        key = key.removeprefix(PREFIX)
        if key.endswith((lora_a, lora_b)) or ".original_module." in key:
            continue
        if ".base_layer." in key:
            layer, name = key.split(".base_layer.")
            a, b = state.get(f"{PREFIX}{layer}{lora_a}"), state.get(f"{PREFIX}{layer}{lora_b}")
            if name == "weight" and a is not None and b is not None:
                delta = (b.float() @ a.float()) * scale
                value = (value.float() + delta).to(value.dtype)
            out[f"{layer}.{name}"] = value
        elif f".modules_to_save.{adapter}." in key:
            out[key.replace(f".modules_to_save.{adapter}.", ".")] = value
        else:
            out[key] = value
    return out
