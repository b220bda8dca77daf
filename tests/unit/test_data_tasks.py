"""Tasks: arith determinism and checker, GSM8K parsing/corruption on a tiny file, HH task, get_task."""
import json
import random

import pytest

from unipipe_ray.data import ArithTask, DataError, PromptExample, corrupt_solution, extract_answer, get_task

GSM = [{"question": "Tom has 3 bags of 4 apples. How many apples?",
        "answer": "He has 3*4 = <<3*4=12>>12 apples.\n#### 12"},
       {"question": "A car costs $1,200 and a bike $300. Total?",
        "answer": "Total is 1,200+300 = $<<1200+300=1500>>1,500.\n#### 1,500"}]


def prompt_with(answer):
    return PromptExample(({"role": "user", "content": "q"},), "t:1", {"answer": answer})


@pytest.mark.parametrize("text, expected", [
    ("so #### 72", "72"), ("#### $1,250.", "1250"), ("#### -3 apples", "-3"), ("#### 2.5", "2.5"),
    ("#### 1\n#### 7", "7"), ("no marker 72", None), ("#### none", None), ("", None)])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_arith_is_deterministic_for_a_seed():
    def dump(task):
        return [(p.prompt, p.chosen, p.rejected) for p in task.preference_pairs(seed=1)]

    assert dump(ArithTask(n=20, seed=5)) == dump(ArithTask(n=20, seed=5))
    assert dump(ArithTask(n=20, seed=5)) != dump(ArithTask(n=20, seed=6))


def test_arith_step_format_and_checker():
    task = ArithTask(n=200, seed=0, max_steps=3, max_value=12)
    for prompt, sft, pair in zip(task.prompts(), task.sft_examples(), task.preference_pairs(), strict=True):
        lines = sft.response.split("\n")
        assert all(line.startswith(f"Step {i + 1}: ") for i, line in enumerate(lines[:-1]))
        assert 1 <= len(lines) - 1 <= 3 and lines[-1].startswith("#### ")
        assert sft.response == pair.chosen and prompt.prompt == sft.prompt
        assert task.gold_reward(prompt, pair.chosen) == 1.0
        assert task.gold_reward(prompt, pair.rejected) == 0.0
        assert pair.chosen.count("\n") == pair.rejected.count("\n")  # same steps, one slipped


def test_arith_slip_propagates():
    task = ArithTask(n=1, seed=0)
    problem = task.problems[0]
    for step in range(len(problem.steps)):
        bad = problem.solution(slip=(step, 1))
        assert extract_answer(bad) != str(problem.answer)
        assert bad.split("\n")[:step] == problem.solution().split("\n")[:step]


def test_gold_reward_compares_numerically():
    task = ArithTask(n=1)
    assert task.gold_reward(prompt_with("1500"), "so the total is #### $1,500.00") == 1.0
    assert task.gold_reward(prompt_with("1500"), "the total is 1500") == 0.0  # no answer marker


def test_gsm8k_sft_pairs_prompts(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    task = get_task("gsm8k", path)
    sft, pairs, prompts = task.sft_examples(), task.preference_pairs(seed=0), task.prompts()
    assert sft[0].response == "He has 3*4 = 12 apples.\n#### 12"  # calculator annotation removed
    assert sft[1].meta["answer"] == "1500" and prompts[1].meta["solution"] == sft[1].response
    for prompt, pair in zip(prompts, pairs, strict=True):
        assert task.gold_reward(prompt, pair.chosen) == 1.0 and task.gold_reward(prompt, pair.rejected) == 0.0
    assert pairs[0].source == f"{path}:1"


def test_corrupt_solution_changes_the_last_result_and_final_line():
    rng = random.Random(0)
    bad = corrupt_solution("Total is 1,200+300 = $1,500.\n#### 1,500", rng)
    wrong = extract_answer(bad)
    assert wrong != "1500" and f"= ${int(wrong):,}." in bad and bad.startswith("Total is 1,200+300 = $")


def test_gsm8k_bad_record_names_line(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps(GSM[0]) + "\n" + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(DataError, match=r"gsm\.jsonl:2: field 'answer' does not end in '#### <number>'"):
        get_task("gsm8k", path)
    assert len(get_task("gsm8k", path, on_bad_record="skip").sft_examples()) == 1


def test_hh_task_from_a_small_file(tmp_path):
    hi, x = "\n\nHuman: hi\n\nAssistant: ", "\n\nHuman: x\n\nAssistant: "
    rows = [{"chosen": hi + "hello", "rejected": hi + "go away"}, {"chosen": x, "rejected": x + "y"}]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("hh_harmless", path)
    assert task.report.summary().startswith("skipped 1 of 2 records: 1 empty_field")
    assert task.sft_examples()[0].response == "hello" and task.prompts()[0].prompt[0]["content"] == "hi"
    assert not task.has_gold_reward and task.gold_reward is None


def test_get_task_errors():
    with pytest.raises(ValueError, match="unknown task 'mmlu'; known tasks: gsm8k, hh_harmless, arith"):
        get_task("mmlu")
    with pytest.raises(ValueError, match="pass path="):
        get_task("gsm8k")
    assert get_task("arith", n=3).name == "arith"
    with pytest.raises(ValueError, match="takes no path"):
        get_task("arith", path="x.jsonl")


def test_get_task_file_tasks_reject_generation_knobs(tmp_path):
    # A file-backed task has no size or seed to set: passing one is a mistake, not something to ignore.
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    assert len(get_task("gsm8k", path).sft_examples()) == 2
    with pytest.raises(TypeError):
        get_task("gsm8k", path, n=1)
