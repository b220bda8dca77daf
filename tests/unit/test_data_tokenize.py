"""Tokenization: prompt masking, EOS exactly once, the truncation policy, shared pair prompts, skip policy.

Truncation arithmetic uses a one-token-per-character tokenizer (no chat template, EOS = "\\x00"), so token
counts are string lengths; chat-template and EOS behaviour use the real SmolLM2 tokenizer.
"""
import pytest

from unipipe_ray.data import (
    DataError,
    LoadReport,
    PreferencePair,
    PromptExample,
    SFTExample,
    tokenize_all,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)


class CharTokenizer:
    chat_template = None
    eos_token_id = 0
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


CHAR = CharTokenizer()


def user(text):
    return ({"role": "user", "content": text},)


def decode(ids):
    return "".join(chr(i) for i in ids)


def test_prompt_masked_and_eos_once_at_the_end(tokenizer):
    ex = SFTExample(user("What is 2+2?"), "4", "t:1", {})
    out = tokenize_sft(ex, tokenizer, max_length=128)
    prompt = tokenizer.apply_chat_template(list(ex.prompt), tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert len(out["input_ids"]) == len(out["labels"])
    assert out["labels"][:n_prompt] == [-100] * n_prompt
    assert out["labels"][n_prompt:] == out["input_ids"][n_prompt:]
    assert tokenizer.decode(out["input_ids"][n_prompt:]) == "4<|im_end|>"
    assert out["input_ids"].count(tokenizer.eos_token_id) == prompt.count("<|im_end|>") + 1
    assert out["input_ids"][-1] == tokenizer.eos_token_id


def test_response_already_ending_with_eos_gets_no_second_one(tokenizer):
    plain = tokenize_sft(SFTExample(user("hi"), "hello", "t:1", {}), tokenizer, 128)
    ended = tokenize_sft(SFTExample(user("hi"), "hello<|im_end|>", "t:1", {}), tokenizer, 128)
    assert ended == plain


def test_no_chat_template_falls_back_to_role_lines():
    out = tokenize_sft(SFTExample(user("hi"), "yo", "t:1", {}), CHAR, max_length=64)
    assert decode(out["input_ids"]) == "user: hi\nassistant: yo\x00"
    assert out["labels"] == [-100] * len("user: hi\nassistant: ") + [ord("y"), ord("o"), 0]


def test_long_prompt_loses_its_start_only_as_far_as_needed():
    # prompt "user: <26 letters>\nassistant: " = 44 tokens, response "ok" + EOS = 3; max_length 40
    ex = SFTExample(user("abcdefghijklmnopqrstuvwxyz"), "ok", "t:1", {})
    out = tokenize_sft(ex, CHAR, max_length=40, max_prompt_length=10)
    assert decode(out["input_ids"]) == "bcdefghijklmnopqrstuvwxyz\nassistant: ok\x00"  # 7 dropped, EOS kept


def test_prompt_floor_then_response_cut_without_eos():
    # prompt 44 tokens cut to its last 20, leaving 10 of the 31 response tokens, so no EOS fits
    ex = SFTExample(user("abcdefghijklmnopqrstuvwxyz"), "0123456789ABCDEFGHIJKLMNOPQRST", "t:1", {})
    out = tokenize_sft(ex, CHAR, max_length=30, max_prompt_length=20)
    assert decode(out["input_ids"]) == "stuvwxyz\nassistant: 0123456789"
    assert 0 not in out["input_ids"] and out["labels"].count(-100) == 20


def test_default_prompt_limit_is_half_of_max_length():
    ex = SFTExample(user("x" * 100), "y" * 100, "t:1", {})
    assert tokenize_sft(ex, CHAR, max_length=64)["labels"].count(-100) == 32


def test_nothing_left_after_truncation_names_the_source():
    ex = SFTExample(user("x" * 50), "answer", "train.jsonl:9", {})
    with pytest.raises(DataError, match=r"train\.jsonl:9: no response token fits") as info:
        tokenize_sft(ex, CHAR, max_length=16, max_prompt_length=16)
    assert info.value.kind == "empty_after_truncation"


def test_chosen_and_rejected_share_the_prompt(tokenizer):
    pair = PreferencePair(user("Capital of France?"), "Paris.", "Berlin, a city in Germany.", "t:1", {})
    out = tokenize_preference(pair, tokenizer, max_length=256)
    n = out["chosen_labels"].count(-100)
    assert n == out["rejected_labels"].count(-100) > 0
    assert out["chosen_input_ids"][:n] == out["rejected_input_ids"][:n]
    assert out["chosen_input_ids"][-1] == out["rejected_input_ids"][-1] == tokenizer.eos_token_id


def test_pair_prompt_is_cut_once_for_the_longer_response():
    pair = PreferencePair(user("abcdefghijklmnopqrstuvwxyz"), "short", "a much longer reply", "t:1", {})
    out = tokenize_preference(pair, CHAR, max_length=40, max_prompt_length=8)
    n = out["chosen_labels"].count(-100)
    assert n == out["rejected_labels"].count(-100) == 40 - len("a much longer reply\x00")
    assert decode(out["rejected_input_ids"]).endswith("assistant: a much longer reply\x00")


def test_pair_identical_after_truncation_is_an_error():
    pair = PreferencePair(user("q"), "same start, then A", "same start, then B", "t:4", {})
    with pytest.raises(DataError, match=r"t:4: .*identical after truncation") as info:
        tokenize_preference(pair, CHAR, max_length=30)
    assert info.value.kind == "identical_after_truncation"


def test_prompt_tokens_end_with_generation_header(tokenizer):
    out = tokenize_prompt(PromptExample(user("hi"), "t:1", {}), tokenizer, max_prompt_length=64)
    text = tokenizer.decode(out["input_ids"])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    cut = tokenize_prompt(PromptExample(user("x" * 50), "t:1", {}), CHAR, 8)
    assert decode(cut["input_ids"]) == "istant: "  # the last 8 tokens


def test_tokenize_all_skip_counts_in_the_report():
    examples = [SFTExample(user("q"), "a", "f:1", {}), SFTExample(user("x" * 40), "b", "f:2", {})]
    report = LoadReport(total=2)
    features = tokenize_all(examples, "sft", CHAR, 20, "skip", report, max_prompt_length=20)
    assert len(features) == 1
    assert report.summary() == "skipped 1 of 2 records: 1 empty_after_truncation (first: f:2)"
    with pytest.raises(DataError, match="f:2"):
        tokenize_all(examples, "sft", CHAR, 20, "error", max_prompt_length=20)
    with pytest.raises(DataError, match="no example left"):
        tokenize_all(examples[1:], "sft", CHAR, 20, "skip", max_prompt_length=20)
    assert tokenize_all([], "sft", CHAR, 20) == []  # an empty eval split is not an error
