"""The LoRA merge from a full state dict (core/lora_merge.py) against PEFT's own merge_and_unload, for a
causal LM and for a reward model whose score head is a fully trained module copy."""

import copy

import pytest
import torch

from unipipe_ray.config import LoraConfig
from unipipe_ray.core.lora_merge import merge_lora_state
from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.runtime.checkpoint import apply_lora


def _trained(model):
    """Non-zero adapters (PEFT starts B at 0, which would make any merge look right) and a changed head."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("kind", ["causal", "reward"])
def test_merge_from_the_state_dict_equals_peft_merge_and_unload(kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    lora = LoraConfig(enabled=True, r=4, alpha=8)
    path = tiny_model_dir()
    if kind == "causal":
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}  # PEFT rewires ``base`` in place
    model = _trained(apply_lora(base, lora, "CAUSAL_LM" if kind == "causal" else "SEQ_CLS"))
    merged = merge_lora_state(model.state_dict(), lora.alpha, lora.r)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)
    changed = [k for k in expected if not torch.equal(expected[k], before[k])]
    assert any("q_proj" in k for k in changed) and (kind == "causal" or "score.weight" in changed), changed
    # (the adapters did change the weights: the comparison is not between two copies of the base)


def test_a_plain_state_dict_is_refused():
    with pytest.raises(ValueError, match="not a PEFT state dict"):
        merge_lora_state({"model.embed_tokens.weight": torch.zeros(2, 2)}, 8, 4)
