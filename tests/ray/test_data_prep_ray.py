"""Tokenizing on Ray Data: the shards run as Ray Data tasks on the local cluster and give the same rows, errors
and skip counts as reading the files straight through in one process (tests/unit/test_data_cache.py holds
the full list of bad-record classes against the driver executor; here a few that cross shard boundaries)."""
import logging

import pytest

from tests.data_cases import GOOD, cached, direct, outcome, sft_line, write_case, write_lines
from unipipe_ray.config import DataConfig, DataSource
from unipipe_ray.data import cache

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(cache, "SHARD_BYTES", 300)


def test_ray_data_gives_the_rows_of_the_direct_path(ray_cluster, tokenizer, tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [sft_line(i, "a") for i in range(60)])
    b = write_lines(tmp_path / "b.jsonl.gz", [sft_line(i, "b") for i in range(20)], gz=True)
    data = DataConfig(sources=(DataSource(str(a)), DataSource(str(b), 0.5)), eval_size=6, max_length=48, seed=2)
    assert len(cache.plan_shards(data, "sft")) >= 6
    assert cached(data, "sft", tokenizer, tmp_path / "c", executor="ray_data") == direct(data, "sft", tokenizer)
    task = DataConfig(task_size=120, eval_size=8, max_length=160)
    for kind in ("sft", "preference"):
        assert cached(task, kind, tokenizer, tmp_path / "c", executor="ray_data") == direct(task, kind, tokenizer)


@pytest.mark.parametrize("name,policy", [("malformed_json", "error"), ("malformed_json", "skip"),
                                         ("identical_after_truncation", "error"), ("identical_pair", "skip"),
                                         ("corrupt_gzip", "skip")])
def test_ray_data_gives_the_same_errors_and_skips(ray_cluster, tokenizer, tmp_path, caplog, name, policy):
    kind, path = write_case(tmp_path, name)
    data = DataConfig(sources=(DataSource(str(path)), DataSource(str(path))), eval_size=2, max_length=24,
                      on_bad_record=policy)
    expected = outcome(lambda: direct(data, kind, tokenizer), caplog)
    with caplog.at_level(logging.INFO):
        got = outcome(lambda: cached(data, kind, tokenizer, tmp_path / "c", executor="ray_data"), caplog)
    assert got == expected


def test_a_stage_tokenizes_on_ray_data_then_reuses_the_cache(ray_cluster, tmp_path):
    from unipipe_ray.config import SFTConfig, load_config
    from unipipe_ray.stages.sft import run_sft

    path = write_lines(tmp_path / "x.jsonl", GOOD * 3)
    overrides = ["model=tiny", f"data.sources=[{{path: {path}}}]", "data.eval_size=4", "data.max_length=48",
                 "data.tokenize_with=ray_data", "train.max_steps=2", "train.batch_size=2"]
    first = run_sft(load_config(SFTConfig, overrides=overrides + [f"output_dir={tmp_path}/one/sft"]))
    second = run_sft(load_config(SFTConfig, overrides=overrides + [f"output_dir={tmp_path}/two/sft",
                                                                    f"data.cache_dir={tmp_path}/one/data_cache"]))
    assert (first["data"]["executor"], first["data"]["reused"]) == ("ray_data", False)
    assert second["data"]["reused"] and second["data"]["cache"] == first["data"]["cache"]
    assert first["train_examples"] == second["train_examples"] == 38
