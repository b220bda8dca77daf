"""Reader and task gaps that escaped as tracebacks or changed inputs silently: each now a located DataError
or a logged count, and at stage time a message with exit 2."""

import gzip
import json
import logging
import random

import pytest

from unipipe_ray.cli import main
from unipipe_ray.config import DataConfig
from unipipe_ray.data import DataError, read_raw, tokenize_all
from unipipe_ray.data.records import SFTExample
from unipipe_ray.data.stage_data import make_task, stage_examples
from unipipe_ray.data.tasks import Gsm8kTask, HHHarmlessTask, corrupt_solution


def corrupt_gzip(data: bytes) -> bytes:
    packed = bytearray(gzip.compress(data))
    packed[11] ^= 0xFF  # a flipped byte at the start of the deflate stream: zlib.error on read
    return bytes(packed)


@pytest.mark.parametrize("name", ["a.json.gz", "a.jsonl.gz"])
def test_corrupt_gzip_is_a_located_data_error(tmp_path, name):
    rows = [{"prompt": f"q{i}", "response": "r" * 50} for i in range(200)]
    text = json.dumps(rows) if name.startswith("a.json.") else "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / name).write_bytes(corrupt_gzip(text.encode()))
    with pytest.raises(DataError, match="cannot read gzip stream") as e:
        list(read_raw(tmp_path / name))
    assert name in str(e.value)


def test_deeply_nested_json_is_a_located_data_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "response": "b"}\n' + deep + "\n")
    (tmp_path / "a.json").write_text(deep)
    with pytest.raises(DataError, match=r"a\.jsonl:2: .*nested too deeply"):
        list(read_raw(tmp_path / "a.jsonl"))
    with pytest.raises(DataError, match="nested too deeply"):
        list(read_raw(tmp_path / "a.json"))


def test_a_saved_dataset_dict_with_no_splits(tmp_path):
    (tmp_path / "dataset_dict.json").write_text('{"splits": []}')
    with pytest.raises(DataError, match="no splits"):
        list(read_raw(tmp_path))


GSM = [{"question": "Ann has 1,240 dollars and earns 10. How much?",
        "answer": "1240+10=<<1240+10=1250>>1,250\n#### $1,250"},
       {"question": "Two plus two?", "answer": "2+2=4\n#### 4."},
       {"question": "Broken", "answer": "no final line"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_currency_answers_make_pairs_and_on_bad_record_is_honoured(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM)
    with pytest.raises(DataError, match=r"gsm\.jsonl:3: .*#### <number>"):
        make_task(DataConfig(task="gsm8k", task_path=str(path)))  # on_bad_record: error (the default)
    task = make_task(DataConfig(task="gsm8k", task_path=str(path), on_bad_record="skip"))
    assert len(task.sft_examples()) == 2 and task.report.skipped == 1
    pairs = task.preference_pairs(seed=0)
    assert pairs[0].rejected.startswith("1240+10=") and "#### $1," in pairs[0].rejected
    assert pairs[0].rejected != pairs[0].chosen and pairs[1].rejected.endswith(".")
    assert corrupt_solution("x\n#### 4.", random.Random(0)).endswith(".")


def test_hh_harmless_honours_on_bad_record(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"hh\.jsonl:2"):
        make_task(DataConfig(task="hh_harmless", task_path=str(path)))
    assert len(make_task(DataConfig(task="hh_harmless", task_path=str(path), on_bad_record="skip")).pairs) == 1
    assert len(HHHarmlessTask(path).pairs) == 1  # the class on its own keeps its documented default: skip
    assert Gsm8kTask  # imported for the gsm8k test above


def test_cut_prompts_a_missing_chat_template_and_a_short_pool_are_logged(caplog):
    from unipipe_ray.core.models import load_tokenizer

    tok = load_tokenizer("tiny")
    long_system = ({"role": "system", "content": "rules " * 200}, {"role": "user", "content": "hi"})
    examples = [SFTExample(long_system, "ok", "x:1"), SFTExample(({"role": "user", "content": "hi"},), "ok", "x:2")]
    with caplog.at_level(logging.WARNING):
        tokenize_all(examples, "sft", tok, max_length=64)
    assert "of 2 examples, 1 prompts lost their earliest tokens" in caplog.text
    tok.chat_template = None
    tok.name_or_path = "no-template-tokenizer"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokenize_all(examples[1:], "sft", tok, max_length=64)
    assert "no-template-tokenizer has no chat template" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train, _ = stage_examples(DataConfig(task_size=50, eval_size=10, size=100), "sft")
    assert len(train) == 40 and "data.size=100, but only 40 training examples remain" in caplog.text


def test_stage_time_user_errors_exit_2_before_ray_starts(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    assert main(["sft", "model=tiny", f"output_dir={tmp_path}/out", f"data.sources=[{{path: {bad}}}]"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["sft", "model=runs/never/ran", f"output_dir={tmp_path}/out2"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "out" / "sft_config.json").exists()  # a stopped start records no config
