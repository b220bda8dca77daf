"""The answer checker shared by the verifiable tasks (GSM8K, arith): final answers follow "#### "."""
from __future__ import annotations

import re
from decimal import Decimal

from unipipe_ray.data.records import PromptExample

_ANSWER = re.compile(r"\s*\$?\s*(-?[\d,]*\.?\d+)")


def extract_answer(text: str) -> str | None:
    """The number after the last "####" as text, without commas, "$" or a trailing period; None if absent.

    "... #### $1,250." -> "1250"; "#### -3" -> "-3"; "no marker" -> None; "#### none" -> None.
    """
    at = text.rfind("####")
    match = _ANSWER.match(text, at + 4) if at >= 0 else None
    return match.group(1).replace(",", "") if match else None


def answer_reward(prompt_ex: PromptExample, completion: str) -> float:
    """1.0 when the completion's final answer equals prompt_ex.meta["answer"] numerically, else 0.0."""
    if "answer" not in prompt_ex.meta:
        raise ValueError(f"{prompt_ex.source}: prompt has no meta['answer'] to check against")
    predicted = extract_answer(completion)
    # Decimal, not float: "72" == "72.0" holds, and large integers compare exactly.
    gold = Decimal(str(prompt_ex.meta["answer"]).replace(",", ""))
    return float(predicted is not None and Decimal(predicted) == gold)
