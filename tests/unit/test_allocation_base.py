"""The prose answers the allocation base model is pretrained on (experiments/allocation_base.py): they state the
arithmetic and the right final number, and never use the task's answer format ("Step k:" lines, "#### n")."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

from allocation_base import name_and_item, pretraining_examples, prose_solution  # noqa: E402

from unipipe_ray.data.arith import ArithProblem, ArithTask  # noqa: E402


def _problem() -> ArithProblem:
    """Ada has 3 apples; +5 -> 8; *2 -> 16; -4 -> 12."""
    question = ("Ada has 3 apples. Ada finds 5 more apples. Ada then has 2 times as many apples. Ada gives away 4 "
                "apples. How many apples does Ada have now?")
    return ArithProblem(question, 3, (("+", 5), ("*", 2), ("-", 4)))


@pytest.mark.parametrize("variant, expected", [
    (0, "Ada starts with 3 apples. Finding 5 more makes 3 + 5 = 8. Having 2 times as many makes 8 * 2 = 16. "
        "Giving away 4 leaves 16 - 4 = 12. So Ada has 12 apples now."),
    (1, "First, 3 + 5 = 8.\nThen, 8 * 2 = 16.\nNext, 16 - 4 = 12.\nAda has 12 apples."),
    (2, "Ada has 3 apples and finds 5 more: 8, then gets 2 times as many: 16, then gives away 4: 12. "
        "So Ada has 12 apples."),
])
def test_prose_solution_worked_example(variant, expected):
    assert prose_solution(_problem(), variant) == expected


def test_name_and_item():
    assert name_and_item(_problem()) == ("Ada", "apples")


def test_prose_never_has_the_answer_format_and_ends_on_the_answer():
    problems = ArithTask(n=300, seed=5).problems
    for i, p in enumerate(problems):
        text = prose_solution(p, i)
        assert "####" not in text and "Step" not in text and "step" not in text.lower()
        assert re.findall(r"-?\d+", text)[-1] == str(p.answer)
        value = p.start
        for op, b in p.steps:  # every intermediate result is stated
            value = value + b if op == "+" else value - b if op == "-" else value * b
            assert re.search(rf"(?<!\d){value}(?!\d)", text)


def test_pretraining_examples_skip_excluded_questions_and_are_deterministic():
    pool = {p.question for p in ArithTask(n=50, seed=3).problems}
    examples = pretraining_examples(50, seed=3, exclude=pool)  # the same seed: every question must be redrawn
    assert len(examples) == 50
    assert not {ex.prompt[-1]["content"] for ex in examples} & pool
    assert [ex.response for ex in examples] == [ex.response for ex in pretraining_examples(50, seed=3, exclude=pool)]
    assert all(ex.prompt[-1]["role"] == "user" and "####" not in ex.response for ex in examples)
