"""A stage's data from its ``data:`` config: the task or the user's sources, the held-out split, the training
size or budget share, tokenized. The driver calls this once before it starts the workers.
"""

from __future__ import annotations

import logging
import random

from unipipe_ray.config import DataConfig
from unipipe_ray.data.load import load_examples
from unipipe_ray.data.split import budget_split
from unipipe_ray.data.tasks import get_task
from unipipe_ray.data.tokenize import tokenize_all

log = logging.getLogger(__name__)


def make_task(data: DataConfig):
    """The config's task: the generated one takes a size and seed, the file-backed ones a path."""
    if data.task == "arith":
        return get_task("arith", n=data.task_size, seed=data.seed)
    if data.task_path is None:
        raise ValueError(f"data.task={data.task!r} reads a file: set data.task_path")
    task = get_task(data.task, path=data.task_path, on_bad_record=data.on_bad_record)
    if task.report.skipped:
        log.warning("task %s (%s): %s", data.task, data.task_path, task.report.summary())
    return task


def stage_examples(data: DataConfig, kind: str) -> tuple[list, list]:
    """Examples of ``kind`` (sft | preference | prompt) -> (train, held-out eval), before tokenization.

    User sources win over the built-in task. The eval split is taken before ``size`` so that it does not
    change when the training size does. Bad records follow ``on_bad_record``; skips are logged with counts.
    """
    if data.sources:
        examples, report = load_examples(kind, [(s.path, s.weight) for s in data.sources],
                                         on_bad_record=data.on_bad_record, seed=data.seed)
    else:
        task = make_task(data)
        examples, report = {"sft": task.sft_examples, "prompt": task.prompts,
                            "preference": lambda: task.preference_pairs(seed=data.seed)}[kind](), None
    if report is not None and (report.skipped or report.notes):  # skips, and what a mixture repeated
        log.warning("%s", report.summary())
    return select_split(examples, data, kind)


def select_split(examples: list, data: DataConfig, kind: str) -> tuple[list, list]:
    """(train, held-out) of a stage's examples (or of their row numbers: only positions matter): the seeded
    held-out split, then ``size`` or the ``budget`` share."""
    order = list(range(len(examples)))
    random.Random(data.seed).shuffle(order)
    if data.eval_size >= len(examples):
        raise ValueError(f"data.eval_size={data.eval_size} leaves no training data ({len(examples)} examples)")
    train_examples = [examples[i] for i in order[data.eval_size:]]
    if data.size is not None:
        if data.size > len(train_examples):
            log.warning("data.size=%d, but only %d training examples remain after the %d held out: using %d",
                        data.size, len(train_examples), data.eval_size, len(train_examples))
        train_examples = train_examples[:data.size]
    if data.budget is not None:
        train_examples = budget_part(train_examples, data, kind)
    return train_examples, [examples[i] for i in order[:data.eval_size]]


def budget_part(pool: list, data: DataConfig, kind: str) -> list:
    """This stage's share of ``data.budget`` questions of the training pool: the SFT indices of budget_split
    for kind sft, the preference ones for kind preference. Both stages see the same pool in the same order
    (same task, same seed), so the two shares are disjoint questions."""
    if kind not in ("sft", "preference"):
        raise ValueError(f"data.budget splits SFT and preference data; a {kind} stage cannot use it")
    if data.budget > len(pool):
        raise ValueError(f"data.budget={data.budget} exceeds the {len(pool)} training questions of task "
                         f"{data.task!r} (raise data.task_size or lower the budget)")
    sft, pref = budget_split(len(pool), data.budget, data.sft_ratio, data.budget_seed)
    picked = sft if kind == "sft" else pref
    if not picked:
        raise ValueError(f"data.budget={data.budget} at sft_ratio={data.sft_ratio} leaves no {kind} data: "
                         f"skip this stage")
    return [pool[i] for i in picked]


def load_stage_data(data: DataConfig, kind: str, tokenizer) -> tuple[list, list, list]:
    """(train features, eval features, eval examples): ``stage_examples`` tokenized (chat template, masks)."""
    train_examples, eval_examples = stage_examples(data, kind)
    features = [tokenize_all(part, kind, tokenizer, data.max_length, data.on_bad_record,
                             max_prompt_length=data.max_prompt_length) for part in (train_examples, eval_examples)]
    return features[0], features[1], eval_examples
