"""load_examples: the error/skip policy, its report, and weighted mixtures."""
import json
import logging
from collections import Counter

import pytest

from unipipe_ray.data import DataError, load_examples


def write_sft(path, n, tag):
    path.write_text("".join(json.dumps({"prompt": f"{tag} q{i}", "response": f"a{i}", "src": tag}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture
def messy(tmp_path):
    """5 lines: 2 good, 2 identical pairs, 1 malformed JSON."""
    lines = [json.dumps({"prompt": "q1", "chosen": "a", "rejected": "b"}),
             json.dumps({"prompt": "q2", "chosen": "a", "rejected": "a"}),
             '{"prompt": "q3", ',
             json.dumps({"prompt": "q4", "chosen": "c", "rejected": "c"}),
             json.dumps({"prompt": "q5", "chosen": "d", "rejected": "e"})]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_source_gives_all_records_in_order(tmp_path):
    examples, report = load_examples("sft", [(write_sft(tmp_path / "a.jsonl", 5, "a"), 1.0)])
    assert [ex.prompt[0]["content"] for ex in examples] == [f"a q{i}" for i in range(5)]
    assert (report.total, report.kept, report.summary()) == (5, 5, "kept all 5 records")


def test_error_mode_raises_the_first_bad_record(messy):
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: .*identical"):
        load_examples("preference", [(messy, 1.0)])


def test_skip_mode_counts_by_kind_and_warns(messy, caplog):
    with caplog.at_level(logging.WARNING):
        examples, report = load_examples("preference", [(messy, 1.0)], on_bad_record="skip")
    assert [ex.prompt[0]["content"] for ex in examples] == ["q1", "q5"]
    assert (report.total, report.kept) == (5, 2)
    assert report.skipped_by_kind == Counter(identical_pair=2, malformed_json=1)
    expected = f"skipped 3 of 5 records: 2 identical_pair, 1 malformed_json (first: {messy}:2)"
    assert report.summary() == expected
    assert expected in caplog.text


def test_everything_skipped_raises(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q"}\n{"prompt": "r"}\n')
    expected = r"bad\.jsonl: no usable records \(skipped 2 of 2 records: 2 missing_field"
    with pytest.raises(DataError, match=expected):
        load_examples("sft", [(path, 1.0)], on_bad_record="skip")


def test_mixture_without_size_is_largest_without_repeats(tmp_path):
    a, b = write_sft(tmp_path / "a.jsonl", 100, "a"), write_sft(tmp_path / "b.jsonl", 30, "b")
    examples, report = load_examples("sft", [(a, 2.0), (b, 1.0)], seed=3)
    counts = Counter(ex.meta["src"] for ex in examples)
    assert counts == {"a": 60, "b": 30}  # b is scarce: 30 at share 1/3 sets the size to 90
    assert len({ex.source for ex in examples}) == 90  # nothing repeated
    assert "b.jsonl: 30 of 30 (all" in report.summary()
    assert "a.jsonl: 60 of 100 (subsampled" in report.summary()


def test_mixture_with_size_repeats_small_sources_and_says_so(tmp_path):
    a, b = write_sft(tmp_path / "a.jsonl", 100, "a"), write_sft(tmp_path / "b.jsonl", 10, "b")
    examples, report = load_examples("sft", [(a, 1.0), (b, 1.0)], size=50, seed=0)
    assert Counter(ex.meta["src"] for ex in examples) == {"a": 25, "b": 25}
    b_sources = Counter(ex.source for ex in examples if ex.meta["src"] == "b")
    assert len(b_sources) == 10 and sorted(set(b_sources.values())) == [2, 3]  # 2 full copies + 5 more
    assert "b.jsonl: 25 of 10 (repeated, x2.50)" in report.summary()


def test_mixture_is_deterministic_for_a_seed_and_shuffled(tmp_path):
    a, b = write_sft(tmp_path / "a.jsonl", 40, "a"), write_sft(tmp_path / "b.jsonl", 40, "b")
    run = lambda seed: [ex.source for ex in load_examples("sft", [(a, 1), (b, 3)], seed=seed, size=40)[0]]
    assert run(1) == run(1) != run(2)
    assert [s.split(":")[0].endswith("a.jsonl") for s in run(1)].count(True) == 10
    assert run(1) != sorted(run(1))


@pytest.mark.parametrize("sources, message", [
    ([], "sources is empty"),
    ([("a.jsonl", 0)], "weight must be a finite number > 0"),
    ([("a.jsonl", -1.0)], "weight must be a finite number > 0"),
    ([("a.jsonl",)], r"\(path, weight\) pair"),
])
def test_sources_are_validated(sources, message):
    with pytest.raises(ValueError, match=message):
        load_examples("sft", sources)


def test_kind_policy_and_size_are_validated(tmp_path):
    a = write_sft(tmp_path / "a.jsonl", 3, "a")
    with pytest.raises(ValueError, match="unknown kind 'dpo'; expected one of: sft, preference, prompt"):
        load_examples("dpo", [(a, 1.0)])
    with pytest.raises(ValueError, match="unknown on_bad_record 'ignore'"):
        load_examples("sft", [(a, 1.0)], on_bad_record="ignore")
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_examples("sft", [(a, 1.0)], size=0)
