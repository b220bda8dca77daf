"""Model specs resolve to real checkpoints: the packaged SmolLM2 (GGUF -> safetensors), tiny models, dirs."""

import json
from pathlib import Path

import pytest
import torch

from unipipe_ray.core.models import (
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    smollm2_gguf_path,
    tiny_model_dir,
)


def test_tiny_model_shares_the_real_tokenizer():
    tok = load_tokenizer("tiny")
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    model = load_causal_lm("tiny")
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    untied = load_causal_lm(str(tiny_model_dir(tie_word_embeddings=False)))
    assert not untied.config.tie_word_embeddings


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(tmp_path):
    path = resolve_model("smollm2-135m")
    cfg = json.loads((Path(path) / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert (Path(path) / "model.safetensors").exists()
    assert resolve_model("smollm2-135m") == path  # cached: same dir, no second conversion
    assert resolve_model(str(smollm2_gguf_path())) == path  # a GGUF path resolves the same way
    tok = load_tokenizer("smollm2-135m")
    model = load_causal_lm(path)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_bad_specs_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_model(str(tmp_path / "missing_dir"))
    monkeypatch.setenv("UNIPIPE_SMOLLM2_GGUF", str(tmp_path / "x.gguf"))
    with pytest.raises(FileNotFoundError, match="UNIPIPE_SMOLLM2_GGUF=.*is not a file"):
        smollm2_gguf_path()
