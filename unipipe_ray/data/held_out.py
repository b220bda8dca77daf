"""The held-out set: what every evaluation scores and no stage trains on, defined once.

``stage_examples`` splits each stage's data into (train, held-out) by a seeded shuffle, taking the held-out
part first, before ``size`` or a ``budget`` share is drawn from the rest. So the first ``n`` held-out
examples of a data config are never trained on by a stage with that config, as long as
``n <= data.eval_size``. The pipeline's report, a Tune trial's evaluation and ``unipipe eval`` all read
their sets here; ``PipelineConfig.held_out_sections`` says which sections of a pipeline they come from.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from unipipe_ray.config import DataConfig, PipelineConfig
from unipipe_ray.data.stage_data import make_task, stage_examples


class HeldOut(NamedTuple):
    task: object | None   # the task (its gold checker); None for user sources
    examples: list        # SFT examples: the prompts to answer, with reference responses
    pairs: list           # preference pairs ([] when none were asked for)


def held_out(data: DataConfig, n: int, pairs_data: DataConfig | None = None) -> HeldOut:
    """The first ``n`` held-out examples of ``data`` and, with ``pairs_data``, the first ``n`` held-out
    preference pairs of that data config."""
    for d in filter(None, (data, pairs_data)):
        if n > d.eval_size:
            raise ValueError(f"{n} held-out examples asked, but the data holds out only {d.eval_size} "
                             "(the rest were trained on): raise data.eval_size")
    examples = stage_examples(_split_only(data), "sft")[1][:n]
    pairs = stage_examples(_split_only(pairs_data), "preference")[1][:n] if pairs_data is not None else []
    return HeldOut(make_task(data) if not data.sources else None, examples, pairs)


def pipeline_held_out(cfg: PipelineConfig) -> HeldOut:
    """The pipeline's held-out set (``eval_size`` of each): examples and pairs from the sections that
    ``cfg.held_out_sections()`` names."""
    examples_from, pairs_from = cfg.held_out_sections()
    pairs_data = getattr(cfg, pairs_from).data if pairs_from else None
    return held_out(getattr(cfg, examples_from).data, cfg.eval_size, pairs_data)


def _split_only(data: DataConfig) -> DataConfig:
    # The training share (size, budget) does not move the held-out split; leaving it out also spares the
    # errors a share can raise (a budget that leaves this kind of data empty).
    return dataclasses.replace(data, budget=None, size=None)
