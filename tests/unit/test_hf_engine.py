"""The HF rollout engine prefills each prompt once for all its samples: the samples and their log-probs are the
ones the engine draws when every copy of the prompt is prefilled on its own, and they agree with a
teacher-forced forward. Tiny Llama in-process (no Ray)."""

import pytest
import torch

from tests.floors import LOGP_ATOL
from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.ppo.rollout import HFEngine, _batches

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13], [14, 15, 16, 17]]


@pytest.fixture(scope="module")
def engine():
    return HFEngine(str(tiny_model_dir()), device=torch.device("cpu"), batch_size=5)


@pytest.mark.parametrize("n, batch_size, expected", [
    (2, 4, [[(0, 2), (1, 2)], [(2, 2)]]),
    (3, 4, [[(0, 3), (1, 1)], [(1, 2), (2, 2)], [(2, 1)]]),  # the rows of the repeated list, cut every 4
    (5, 2, [[(0, 2)], [(0, 2)], [(0, 1), (1, 1)], [(1, 2)], [(1, 2)], [(2, 2)], [(2, 2)], [(2, 1)]]),
])
def test_batches_cut_the_repeated_prompts_at_the_same_rows(n, batch_size, expected):
    prompts = [[0], [1], [2]]
    got = [[(p[0], c) for p, c in batch] for batch in _batches(prompts, n, batch_size)]
    assert got == expected
    assert sum(c for batch in got for _, c in batch) == n * len(prompts)


def _prefilled_rows(engine, *args, **kwargs):
    """Samples, and how many prompt rows the model ran (a forward of more than one position is a prefill)."""
    rows = []

    def count(_module, _args, inputs):
        if inputs["input_ids"].shape[1] > 1:
            rows.append(inputs["input_ids"].shape[0])

    handle = engine.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        return engine.generate(*args, **kwargs), sum(rows)
    finally:
        handle.remove()


@pytest.mark.parametrize("n", [1, 3])
def test_shared_prefill_draws_what_one_prefill_per_sample_draws(engine, n):
    shared, rows = _prefilled_rows(engine, PROMPTS, n, 8, seed=11)
    # batches of 5 rows: with n=3, prompts 1 and 3 have samples in two batches each, so 6 prefills, not 12
    assert rows == {1: 4, 3: 6}[n]
    # every copy its own prompt: the unshared path, same rows in the same batches, so the same draws
    plain = engine.generate([p for p in PROMPTS for _ in range(n)], 1, 8, seed=11)
    assert len(shared) == len(plain) == n * len(PROMPTS)
    for a, b in zip(shared, plain, strict=True):
        assert a.prompt_ids == b.prompt_ids
        assert a.response_ids == b.response_ids
        assert a.finished == b.finished
        assert a.logps == pytest.approx(b.logps, abs=LOGP_ATOL)


def test_samples_of_one_prompt_differ_and_match_the_teacher_forced_logps(engine):
    samples = engine.generate(PROMPTS, 4, 8, seed=2)
    for i, prompt in enumerate(PROMPTS):
        group = samples[4 * i:4 * i + 4]
        assert all(s.prompt_ids == prompt for s in group)
        assert len({tuple(s.response_ids) for s in group}) > 1  # each row samples on its own
    for engine_logps, scored in zip((s.logps for s in samples), engine.score(samples), strict=True):
        assert engine_logps == pytest.approx(scored, abs=LOGP_ATOL)


def test_eager_decode_on_cpu_draws_what_sdpa_draws_and_leaves_the_model_as_it_was(engine):
    assert engine.decode_attention == "eager"
    before = engine.model.config._attn_implementation
    seen = []
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], module.config._attn_implementation)),
        with_kwargs=True)
    try:
        eager = engine.generate(PROMPTS, 2, 8, seed=5)
        engine.decode_attention = None
        sdpa = engine.generate(PROMPTS, 2, 8, seed=5)
    finally:
        engine.decode_attention = "eager"
        hook.remove()
    assert engine.model.config._attn_implementation == before == "sdpa"
    first = seen[:len(seen) // 2]  # the eager run: prefill with the model's own, decode steps eager
    assert {impl for width, impl in first if width > 1} == {"sdpa"}
    assert {impl for width, impl in first if width == 1} == {"eager"}
    for a, b in zip(eager, sdpa, strict=True):
        assert a.response_ids == b.response_ids
        assert a.logps == pytest.approx(b.logps, abs=LOGP_ATOL)
