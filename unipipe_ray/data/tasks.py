"""Tasks: one question pool giving SFT examples, preference pairs, prompts and (where possible) a gold reward.

For every task, index i of sft_examples(), preference_pairs() and prompts() is the same question, so the
indices from budget_split select disjoint questions for SFT and for preference pairs.

    gsm8k        GSM8K (Cobbe et al. 2021): solutions ending in "#### n"; pairs = correct vs one slip
    hh_harmless  HH-RLHF harmless-base (Bai et al. 2022): human preference pairs; no answer checker
    arith        generated step-format arithmetic word problems (no files needed); see arith.py
"""
from __future__ import annotations

import random
import re
from decimal import Decimal

from unipipe_ray.data.answers import answer_reward, extract_answer
from unipipe_ray.data.arith import ArithTask
from unipipe_ray.data.load import LoadReport, load_examples, read_records
from unipipe_ray.data.records import DataError, PreferencePair, PromptExample, SFTExample

_CALCULATOR = re.compile(r"<<[^>]*>>")
# The "#### " line: an optional currency sign, the number (extract_answer's), and whatever follows ("." etc.).
_FINAL = re.compile(r"(\$?\s*)(-?[\d,]*\.?\d+)(.*)", re.S)


def corrupt_solution(solution: str, rng: random.Random, loc: str = "") -> str:
    """The same solution with one arithmetic slip in its final result: the last mention of n in the working
    and the "#### n" line both become m != n (a shift of 1-9, kept non-negative when n is).
    "#### $1,250." keeps its "$" and "." around the changed number."""
    body, _, final = solution.rpartition("####")
    final = final.strip()
    match = _FINAL.match(final)
    if match is None:
        raise DataError(f"answer line '#### {final[:40]}' holds no number", "missing_answer", loc)
    prefix, number, suffix = match.groups()
    value = Decimal(number.replace(",", ""))
    delta = rng.randint(1, 9) * rng.choice((-1, 1))
    wrong = value + delta if value + delta >= 0 or value < 0 else value + abs(delta)
    wrong_number = f"{wrong:,}" if "," in number else str(wrong)
    for form in dict.fromkeys((number, number.replace(",", ""))):
        mentions = list(re.finditer(rf"(?<![\d.,]){re.escape(form)}(?![\d]|[.,]\d)", body))
        if mentions:
            last = mentions[-1]
            body = body[:last.start()] + wrong_number + body[last.end():]
            break
    return f"{body}#### {prefix}{wrong_number}{suffix}"


class Gsm8kTask:
    """GSM8K from a JSON Lines file of {question, answer}. The SFT response is the reference solution without
    its <<calculator>> annotations; pairs reject the same solution with a slip (corrupt_solution)."""

    name = "gsm8k"
    has_gold_reward = True

    def __init__(self, path, on_bad_record: str = "error"):
        self.path = str(path)
        self.report = LoadReport()
        self.examples = read_records(path, _parse_gsm8k, on_bad_record, self.report)
        if not self.examples:
            raise DataError(f"no usable GSM8K records ({self.report.summary()})", "no_records", self.path)

    def sft_examples(self) -> list[SFTExample]:
        return list(self.examples)

    def preference_pairs(self, seed: int = 0) -> list[PreferencePair]:
        rng = random.Random(seed)
        return [PreferencePair(ex.prompt, ex.response, corrupt_solution(ex.response, rng, ex.source), ex.source,
                               ex.meta) for ex in self.examples]

    def prompts(self) -> list[PromptExample]:
        return [PromptExample(ex.prompt, ex.source, {**ex.meta, "solution": ex.response})
                for ex in self.examples]

    def gold_reward(self, prompt_ex: PromptExample, completion: str) -> float:
        return answer_reward(prompt_ex, completion)


def _parse_gsm8k(raw, loc: str) -> SFTExample:
    if not isinstance(raw, dict):
        raise DataError(f"record: expected a JSON object, got {type(raw).__name__}", "wrong_type", loc)
    for key in ("question", "answer"):
        if key not in raw:
            raise DataError(f"missing field '{key}'", "missing_field", loc)
        if not isinstance(raw[key], str):
            raise DataError(f"field '{key}': expected str, got {type(raw[key]).__name__}", "wrong_type", loc)
        if not raw[key].strip():
            raise DataError(f"field '{key}' is empty", "empty_field", loc)
    answer = extract_answer(raw["answer"])
    if answer is None or _FINAL.match(raw["answer"].rpartition("####")[2].strip()) is None:
        raise DataError("field 'answer' does not end in '#### <number>'", "missing_answer", loc)
    solution = _CALCULATOR.sub("", raw["answer"]).strip()
    meta = {"answer": answer, **{k: v for k, v in raw.items() if k not in ("question", "answer")}}
    return SFTExample(({"role": "user", "content": raw["question"].strip()},), solution, loc, meta)


class HHHarmlessTask:
    """HH-RLHF harmless-base pairs from a file of full-text {chosen, rejected} dialogues. SFT examples are
    prompt + chosen. There is no answer checker, so gold_reward is None (score with a reward model).

    Bad records are skipped by default: the public test split has a few empty responses and pairs whose
    dialogues differ before the final turn. self.report says how many and why.
    """

    name = "hh_harmless"
    has_gold_reward = False
    gold_reward = None  # no verifiable answer exists for harmlessness

    def __init__(self, path, on_bad_record: str = "skip"):
        self.path = str(path)
        self.pairs, self.report = load_examples("preference", [(path, 1.0)], on_bad_record=on_bad_record)

    def sft_examples(self) -> list[SFTExample]:
        return [SFTExample(p.prompt, p.chosen, p.source, p.meta) for p in self.pairs]

    def preference_pairs(self, seed: int = 0) -> list[PreferencePair]:
        """The human-labelled pairs as given; `seed` is unused (nothing is generated)."""
        return list(self.pairs)

    def prompts(self) -> list[PromptExample]:
        return [PromptExample(p.prompt, p.source, p.meta) for p in self.pairs]


TASKS = {"gsm8k": Gsm8kTask, "hh_harmless": HHHarmlessTask, "arith": ArithTask}


def get_task(name: str, path=None, **kwargs):
    """Build a task by name; gsm8k and hh_harmless read `path`, arith is generated (kwargs: n, seed, ...)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if name == "arith":
        if path is not None:
            raise ValueError("task 'arith' is generated and takes no path")
        return ArithTask(**kwargs)
    if path is None:
        raise ValueError(f"task {name!r} reads a data file: pass path=...")
    return TASKS[name](path, **kwargs)
