"""The tokenized-data cache against the direct path (load_stage_data): same token ids in the same order, the
same located errors and skip counts for every bad-record class, reuse without tokenizing, and invalidation.

The shards are cut small here (SHARD_BYTES patched to a few records) so that .jsonl files are read as several
byte ranges and the line numbers in errors must be made absolute across them."""
import dataclasses
import json
import pickle
import re

import pytest

from tests.data_cases import CASES, GOOD, cached, direct, outcome, sft_line, write_case, write_lines
from unipipe_ray.config import DataConfig, DataSource
from unipipe_ray.data import cache
from unipipe_ray.data.table import BATCH_ROWS, FeatureTable, write_shard
from unipipe_ray.runtime.data_prep import cache_root, prepare_stage_data


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(cache, "SHARD_BYTES", 300)


@pytest.mark.parametrize("kind", ["sft", "preference", "prompt"])
def test_task_features_match_the_direct_path(tokenizer, tmp_path, kind):
    data = DataConfig(task_size=150, eval_size=10, max_length=160, seed=3)
    assert cached(data, kind, tokenizer, tmp_path) == direct(data, kind, tokenizer)
    for variant in (dataclasses.replace(data, size=40), dataclasses.replace(data, budget=60, sft_ratio=0.4)):
        if variant.budget and kind == "prompt":
            continue
        assert cached(variant, kind, tokenizer, tmp_path) == direct(variant, kind, tokenizer)


def test_sources_in_every_format_and_a_weighted_mixture_match(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = write_lines(tmp_path / "a.jsonl", [sft_line(i, "a") for i in range(40)])
    b = write_lines(tmp_path / "b.jsonl.gz", [sft_line(i, "b") for i in range(15)], gz=True)
    (tmp_path / "c.json").write_text(json.dumps([json.loads(sft_line(i, "c")) for i in range(12)]))
    pq.write_table(pa.Table.from_pylist([json.loads(sft_line(i, "d")) for i in range(9)]), tmp_path / "d.parquet")
    sources = tuple(DataSource(str(p), w) for p, w in
                    [(a, 1.0), (b, 0.5), (tmp_path / "c.json", 2.0), (tmp_path / "d.parquet", 1.0)])
    assert len(cache.plan_shards(DataConfig(sources=sources[:1]), "sft")) > 3  # a.jsonl is read in ranges
    for chosen in (sources[:1], sources):
        data = DataConfig(sources=chosen, eval_size=6, max_length=48, seed=1)
        got = cached(data, "sft", tokenizer, tmp_path / "cache")
        assert got == direct(data, "sft", tokenizer)
        assert len(got[0]) + len(got[1]) >= 27  # a.jsonl alone: 40; the mixture: what its weights draw


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_bad_record_class_gives_the_same_error_or_skips(tokenizer, tmp_path, caplog, name, policy):
    kind, path = write_case(tmp_path, name)
    data = DataConfig(sources=(DataSource(str(path)),), eval_size=2, max_length=24, on_bad_record=policy)
    expected = outcome(lambda: direct(data, kind, tokenizer), caplog)
    got = outcome(lambda: cached(data, kind, tokenizer, tmp_path / "cache"), caplog)
    assert got == expected
    if policy == "error" and name not in ("json_file_malformed", "corrupt_gzip", "identical_after_truncation"):
        assert expected[0] == "error" and re.search(r"x\.jsonl(\.gz)?:\d+", expected[2])  # located by line
    if policy == "skip" and name not in ("corrupt_gzip", "json_file_malformed"):
        assert expected[0] == "ok" and expected[3]  # the skip was counted and reported


def test_a_second_run_reuses_the_cache_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "x.jsonl", GOOD)
    data = DataConfig(sources=(DataSource(str(path)),), eval_size=2, max_length=32)
    first = prepare_stage_data(data, "sft", tokenizer, str(tmp_path / "cache"))
    assert not first[2]["reused"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("unipipe_ray.runtime.data_prep.tokenize_shard", no_tokenizing)
    for variant in (data, dataclasses.replace(data, eval_size=3, seed=5)):  # the split is not in the key
        again = prepare_stage_data(variant, "sft", tokenizer, str(tmp_path / "cache"))
        assert again[2]["reused"] and again[2]["cache"] == first[2]["cache"]
        assert (list(again[0]), list(again[1])) == direct(variant, "sft", tokenizer)
    task = DataConfig(task_size=50, eval_size=4)
    monkeypatch.undo()
    prepare_stage_data(task, "sft", tokenizer, str(tmp_path / "cache"))
    monkeypatch.setattr("unipipe_ray.runtime.data_prep.tokenize_shard", no_tokenizing)
    monkeypatch.setattr(cache, "make_task", no_tokenizing)  # a task's hit does not even make its examples
    assert prepare_stage_data(task, "sft", tokenizer, str(tmp_path / "cache"))[2]["reused"]


def test_the_key_changes_with_the_file_the_tokenizer_and_max_length(tokenizer, tmp_path):
    from unipipe_ray.core.models import load_tokenizer

    path = write_lines(tmp_path / "x.jsonl", GOOD)
    data = DataConfig(sources=(DataSource(str(path)),), eval_size=2, max_length=32)
    key = cache.cache_key(data, "sft", tokenizer)
    assert cache.cache_key(dataclasses.replace(data, max_length=40), "sft", tokenizer) != key
    assert cache.cache_key(dataclasses.replace(data, eval_size=5, seed=9), "sft", tokenizer) == key
    other = load_tokenizer("tiny")
    other.chat_template = (other.chat_template or "") + " "
    assert cache.cache_key(data, "sft", other) != key
    prepare_stage_data(data, "sft", tokenizer, str(tmp_path / "cache"))
    write_lines(path, GOOD[:-1] + [sft_line(99)])  # same size, one record changed
    assert cache.cache_key(data, "sft", tokenizer) != key
    train, held_out, info = prepare_stage_data(data, "sft", tokenizer, str(tmp_path / "cache"))
    assert not info["reused"] and (list(train), list(held_out)) == direct(data, "sft", tokenizer)


def test_an_errored_read_leaves_no_cache_behind(tokenizer, tmp_path):
    _, path = write_case(tmp_path, "malformed_json")
    data = DataConfig(sources=(DataSource(str(path)),), eval_size=2, max_length=24)
    for _ in range(2):  # not a cached failure: the second run reads again and meets the same error
        with pytest.raises(ValueError, match=r"x\.jsonl:7: malformed JSON"):
            prepare_stage_data(data, "sft", tokenizer, str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("*/meta.json"))


def test_cache_root_defaults(tmp_path):
    assert cache_root(DataConfig(cache_dir="s3://b/c"), tmp_path / "run" / "sft") == "s3://b/c"
    assert cache_root(DataConfig(), tmp_path / "run" / "sft", "s3://b/run") == "s3://b/run/data_cache"
    assert cache_root(DataConfig(), tmp_path / "run" / "sft") == str(tmp_path / "run" / "data_cache")


def test_a_feature_table_reads_only_the_rows_asked_for_and_pickles_small(tmp_path):
    rows = [{"input_ids": list(range(i % 7 + 1)), "labels": [i] * (i % 7 + 1)} for i in range(3 * BATCH_ROWS + 5)]
    files = [str(tmp_path / "a.arrow"), str(tmp_path / "b.arrow")]
    counts = [write_shard(files[0], "sft", rows[:500]), write_shard(files[1], "sft", rows[500:])]
    picked = [700, 3, 499, 500, len(rows) - 1, 250]
    table = FeatureTable(files, counts, picked, "sft")
    assert len(table) == 6 and table[0] == rows[700] and table[1:4] == [rows[3], rows[499], rows[500]]
    assert list(table) == [rows[i] for i in picked]
    assert table.rows_read == 1 + 3 + 6
    whole = FeatureTable(files, counts, range(len(rows)), "sft")
    shipped = pickle.loads(pickle.dumps(whole))
    assert shipped.rows_read == 0 and shipped[len(rows) - 1] == rows[-1] and shipped.rows_read == 1
    assert len(pickle.dumps(whole)) < 16 * len(rows)  # row numbers, not token ids


def test_a_shard_missing_on_this_node_says_where_the_cache_must_be(tmp_path):
    table = FeatureTable([str(tmp_path / "gone.arrow")], [3], [0, 1], "sft")
    with pytest.raises(FileNotFoundError, match=r"gone\.arrow is not on this node .*data\.cache_dir"):
        table[0]


@pytest.mark.parametrize("source", [False, True])
def test_the_ppo_feeder_reads_each_iterations_prompts_from_the_cache(tokenizer, tmp_path, source):
    import random

    from unipipe_ray.config import PPOConfig, TrainConfig
    from unipipe_ray.data import stage_examples, tokenize_prompt
    from unipipe_ray.ppo.controller import iteration_prompts, load_prompts

    data = DataConfig(task_size=200, eval_size=8, max_length=96, seed=4)
    if source:  # a user's prompts with extra fields: the checker's meta must come back as it was read
        path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": f"what is {i} + {i}?", "answer": str(2 * i),
                                                              "tags": ["x", i]}) for i in range(60)])
        data = dataclasses.replace(data, sources=(DataSource(str(path)),))
    cfg = PPOConfig(data=data, prompts_per_iter=6, output_dir=str(tmp_path / "ppo"),
                    train=TrainConfig(seed=3))
    train, _, _, _ = load_prompts(cfg, tokenizer, str(tmp_path / "cache"))
    listed = [(ex, tokenize_prompt(ex, tokenizer, 48)["input_ids"]) for ex in stage_examples(data, "prompt")[0]]
    for it in range(3):  # what the controller drew from the whole list before the cache (train.seed's draw)
        assert iteration_prompts(cfg, train, it) == random.Random(3 * 1_000_003 + it).sample(listed, 6)
    assert len(train) == len(listed) and train.rows_read == 18


def test_a_cache_in_object_storage_is_written_read_and_reused(tokenizer, tmp_path):
    from tests.s3_local import s3_endpoint

    path = write_lines(tmp_path / "x.jsonl", GOOD)
    data = DataConfig(sources=(DataSource(str(path)),), eval_size=2, max_length=32)
    with s3_endpoint() as uri:  # moto's S3 server on this machine
        root = uri("runs/exp/data_cache")
        train, held_out, info = prepare_stage_data(data, "sft", tokenizer, root)
        assert info["cache"].startswith("s3://unipipe-test/runs/exp/data_cache/sft-") and not info["reused"]
        assert len(cache.plan_shards(data, "sft")) > 1  # several shard objects
        assert (list(train), list(held_out)) == direct(data, "sft", tokenizer)
        shipped = pickle.loads(pickle.dumps(train))  # as a worker gets it: it opens the objects itself
        assert shipped[len(train) - 1] == list(train)[-1] and shipped.rows_read == 1
        again = prepare_stage_data(data, "sft", tokenizer, root)
        assert again[2]["reused"] and list(again[0]) == list(train)


def test_truncation_is_reported_only_when_something_was_cut(tokenizer, tmp_path, caplog):
    import logging

    path = write_lines(tmp_path / "x.jsonl", GOOD)
    for max_length, said in ((256, False), (12, True)):
        caplog.clear()
        data = DataConfig(sources=(DataSource(str(path)),), eval_size=2, max_length=max_length)
        with caplog.at_level(logging.WARNING):
            prepare_stage_data(data, "sft", tokenizer, str(tmp_path / "cache"))
            direct(data, "sft", tokenizer)
        cut = [r.getMessage() for r in caplog.records if "lost their earliest tokens" in r.getMessage()]
        assert bool(cut) == said and all(" 0 prompts" not in m for m in cut)
