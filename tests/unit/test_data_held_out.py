"""The one held-out set: the stages' own eval split, whatever share of the rest they train on."""

import pytest

from unipipe_ray.config import DataConfig, PipelineConfig, load_config
from unipipe_ray.data.held_out import held_out, pipeline_held_out
from unipipe_ray.data.stage_data import stage_examples


def sources(items):
    return [x.source for x in items]


def test_held_out_is_the_stages_eval_split_and_ignores_the_training_share():
    data = DataConfig(task_size=200, eval_size=16, seed=3)
    task, examples, pairs = held_out(data, 8, data)
    assert sources(examples) == sources(stage_examples(data, "sft")[1][:8])
    assert sources(pairs) == sources(stage_examples(data, "preference")[1][:8])
    assert task.seed == 3 and len(task.problems) == 200
    budgeted = DataConfig(task_size=200, eval_size=16, seed=3, budget=50, sft_ratio=0.0)  # no SFT share at all
    assert sources(held_out(budgeted, 8).examples) == sources(examples)
    assert held_out(data, 8).pairs == []
    with pytest.raises(ValueError, match="holds out only 16"):
        held_out(data, 17)


def test_the_pipeline_reads_examples_and_pairs_from_the_sections_it_names():
    cfg = load_config(PipelineConfig, None, ["eval_size=4", "sft.data.seed=1", "dpo.data.seed=2",
                                             "rm.data.seed=5", "stages=[sft, rm]"])
    _, examples, pairs = pipeline_held_out(cfg)
    assert sources(examples) == sources(held_out(cfg.sft.data, 4).examples)
    assert sources(pairs) == sources(held_out(cfg.rm.data, 4, cfg.rm.data).pairs)
