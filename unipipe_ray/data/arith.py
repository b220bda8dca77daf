"""A built-in verifiable task: short arithmetic word problems with step-format solutions.

    question: "Ada has 3 apples. Ada finds 5 more apples. Ada then has 2 times as many apples.
               How many apples does Ada have now?"
    solution: "Step 1: 3 + 5 = 8\\nStep 2: 8 * 2 = 16\\n#### 16"

It needs no files (a fresh machine has no shared data), is deterministic for a seed, and uses the same
"#### n" checker as GSM8K. An incorrect solution has one slip (a step result off by 1 or 2) that the later
steps carry on, so its final answer is wrong too: the step format of the paper's math pairs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from unipipe_ray.data.answers import answer_reward
from unipipe_ray.data.records import PreferencePair, PromptExample, SFTExample

_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")
_ITEMS = ("apples", "marbles", "stickers", "coins", "books", "shells")
_SENTENCES = {"+": "{name} finds {b} more {item}.",
              "-": "{name} gives away {b} {item}.",
              "*": "{name} then has {b} times as many {item}."}


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@dataclass(frozen=True)
class ArithProblem:
    question: str
    start: int
    steps: tuple[tuple[str, int], ...]  # (operator, operand), applied in order to the running value

    @property
    def answer(self) -> int:
        value = self.start
        for op, b in self.steps:
            value = _apply(op, value, b)
        return value

    def solution(self, slip: tuple[int, int] | None = None) -> str:
        """Step-format working; slip=(step, delta) adds delta to that step's result and carries it on."""
        lines, value = [], self.start
        for k, (op, b) in enumerate(self.steps):
            result = _apply(op, value, b)
            if slip is not None and k == slip[0]:
                # Flip the sign rather than show a negative count; the shift stays nonzero either way.
                result = result + slip[1] if result + slip[1] >= 0 else result - slip[1]
            lines.append(f"Step {k + 1}: {value} {op} {b} = {result}")
            value = result
        return "\n".join(lines) + f"\n#### {value}"


def make_problem(rng: random.Random, max_steps: int, max_value: int) -> ArithProblem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start = value = rng.randint(2, max_value)
    sentences, steps = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(1, max_steps)):
        op = rng.choice("+-*")
        if op == "-" and value < 1:  # nothing left to give away
            op = "+"
        b = {"+": rng.randint(1, max_value), "-": rng.randint(1, max(value, 1)),
             "*": rng.randint(2, min(4, max_value))}[op]
        sentences.append(_SENTENCES[op].format(name=name, b=b, item=item))
        steps.append((op, b))
        value = _apply(op, value, b)
    sentences.append(f"How many {item} does {name} have now?")
    return ArithProblem(" ".join(sentences), start, tuple(steps))


class ArithTask:
    """n generated problems (1..max_steps steps, operands up to max_value), the same for the same seed."""

    name = "arith"
    has_gold_reward = True

    def __init__(self, n: int = 1000, seed: int = 0, max_steps: int = 3, max_value: int = 20):
        if n < 1 or max_steps < 1 or max_value < 2:
            raise ValueError(f"need n >= 1, max_steps >= 1, max_value >= 2; got n={n}, "
                             f"max_steps={max_steps}, max_value={max_value}")
        rng = random.Random(seed)
        self.seed = seed
        self.problems = [make_problem(rng, max_steps, max_value) for _ in range(n)]

    def _parts(self, i: int, problem: ArithProblem):
        prompt = ({"role": "user", "content": problem.question},)
        return prompt, f"arith(seed={self.seed})[record {i}]", {"answer": str(problem.answer)}

    def sft_examples(self) -> list[SFTExample]:
        out = []
        for i, p in enumerate(self.problems):
            prompt, source, meta = self._parts(i, p)
            out.append(SFTExample(prompt, p.solution(), source, meta))
        return out

    def preference_pairs(self, seed: int = 0) -> list[PreferencePair]:
        """chosen = the correct solution; rejected = one slip at a seeded step, carried to the answer."""
        rng, out = random.Random(seed), []
        for i, p in enumerate(self.problems):
            prompt, source, meta = self._parts(i, p)
            slip = (rng.randrange(len(p.steps)), rng.choice((-2, -1, 1, 2)))
            out.append(PreferencePair(prompt, p.solution(), p.solution(slip), source, meta))
        return out

    def prompts(self) -> list[PromptExample]:
        return [PromptExample(*self._parts(i, p)) for i, p in enumerate(self.problems)]

    def gold_reward(self, prompt_ex: PromptExample, completion: str) -> float:
        return answer_reward(prompt_ex, completion)
