"""The data path on the real files (GSM8K train, HH-RLHF harmless test) with SmolLM2's real tokenizer.

The data lives outside the repo: $UNIPIPE_SHARED_DATA, else <repo>/../shared/data; skipped when absent.
"""
import os
from pathlib import Path

import pytest

from unipipe_ray.data import collate_preference, collate_sft, get_task, load_examples, tokenize_all

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("UNIPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
GSM8K = DATA / "gsm8k" / "train.jsonl"
HH = DATA / "hh-rlhf-harmless" / "test.jsonl.gz"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set UNIPIPE_SHARED_DATA to the shared data directory)")
    return path


def test_hh_harmless_loads_tokenizes_and_collates(tokenizer):
    pairs, report = load_examples("preference", [(need(HH), 1.0)], on_bad_record="skip")
    # The public split has 4 empty chosen responses and 5 dialogues with two assistant turns in a row.
    assert report.total == 2312 and report.kept == len(pairs) == 2303
    assert dict(report.skipped_by_kind) == {"wrong_role": 5, "empty_field": 4}
    features = tokenize_all(pairs[:64], "preference", tokenizer, max_length=256, on_bad_record="error")
    batch = collate_preference(features, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 128 and batch["input_ids"].shape[1] <= 256
    n_response = (batch["labels"] != -100).sum(dim=1)
    assert (n_response > 0).all()
    assert n_response[:64].tolist() != n_response[64:].tolist()  # chosen and rejected rows differ


def test_gsm8k_sft_batch_fits_and_ends_with_eos(tokenizer):
    task = get_task("gsm8k", need(GSM8K))
    assert len(task.sft_examples()) == 7473
    features = tokenize_all(task.sft_examples()[:64], "sft", tokenizer, max_length=512)
    assert all(f["input_ids"][-1] == tokenizer.eos_token_id for f in features)  # nothing was cut
    batch = collate_sft(features, tokenizer.pad_token_id)
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == (64, longest)
    first = features[0]["labels"]
    assert tokenizer.decode([t for t in first if t != -100]).endswith("#### 72<|im_end|>")


def test_gsm8k_gold_reward_on_reference_and_corrupted_solutions():
    task = get_task("gsm8k", need(GSM8K))
    prompts, pairs = task.prompts()[:200], task.preference_pairs(seed=0)[:200]
    assert [task.gold_reward(p, pair.chosen) for p, pair in zip(prompts, pairs, strict=True)] == [1.0] * 200
    assert [task.gold_reward(p, pair.rejected) for p, pair in zip(prompts, pairs, strict=True)] == [0.0] * 200
