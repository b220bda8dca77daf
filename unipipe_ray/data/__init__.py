"""Data for post-training: readers, record checks, tokenization, collation, tasks and the budget split.

    read_raw(path)                      -> (location, raw dict) from jsonl/json(.gz)/parquet/saved dir/hf:
    load_examples(kind, sources, ...)   -> (SFTExample | PreferencePair | PromptExample list, LoadReport)
    tokenize_all(examples, kind, tokenizer, max_length, ...) -> features
    collate_sft / collate_preference / collate_prompts     -> (B, T) / (2B, T) / (B, T) long tensors
    select_pairs(preference_batch, kept)                   -> the kept pairs, as if collated alone
    get_task("gsm8k" | "hh_harmless" | "arith", ...)       -> SFT examples, pairs, prompts, gold reward
    budget_split(pool_size, budget, sft_ratio, seed)       -> disjoint SFT / preference indices
    stage_examples(data_config, kind) / load_stage_data(...) -> a stage's (train, held-out) split, tokenized

Imports torch (collation) but never ray, deepspeed, vllm or transformers: tokenizers are passed in.
"""
from unipipe_ray.data.answers import answer_reward, extract_answer
from unipipe_ray.data.arith import ArithTask
from unipipe_ray.data.collate import collate_preference, collate_prompts, collate_sft, select_pairs
from unipipe_ray.data.load import LoadReport, load_examples
from unipipe_ray.data.readers import read_raw
from unipipe_ray.data.records import (
    DataError,
    PreferencePair,
    PromptExample,
    SFTExample,
    parse_preference,
    parse_prompt,
    parse_sft,
)
from unipipe_ray.data.split import budget_split
from unipipe_ray.data.stage_data import load_stage_data, make_task, stage_examples
from unipipe_ray.data.tasks import Gsm8kTask, HHHarmlessTask, corrupt_solution, get_task
from unipipe_ray.data.tokenize import tokenize_all, tokenize_preference, tokenize_prompt, tokenize_sft

__all__ = [
    "ArithTask", "DataError", "Gsm8kTask", "HHHarmlessTask", "LoadReport", "PreferencePair", "PromptExample",
    "SFTExample", "answer_reward", "budget_split", "collate_preference", "collate_prompts", "collate_sft",
    "corrupt_solution", "extract_answer", "get_task", "load_examples", "load_stage_data", "make_task",
    "parse_preference", "parse_prompt", "parse_sft", "read_raw", "select_pairs", "stage_examples",
    "tokenize_all", "tokenize_preference", "tokenize_prompt", "tokenize_sft",
]
