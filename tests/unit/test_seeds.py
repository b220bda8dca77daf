"""What a run's seed varies and what it keeps: ``train.seed`` drives the training order, PPO's prompt draw
and the own-sample draw; ``data.seed`` the held-out split (and the generated problems). So replicates over
seeds are scored on the same held-out problems and still differ in training (experiments/chain_gains.py
relies on both)."""

import pytest

from unipipe_ray.config import DataConfig, DPOConfig, PPOConfig, TrainConfig, load_config
from unipipe_ray.data.stage_data import stage_examples
from unipipe_ray.pipeline.own_pairs import own_key, own_seed
from unipipe_ray.ppo.controller import iteration_prompts
from unipipe_ray.runtime.loop import Run, step_batches


def run_with(train_seed: int, data_seed: int) -> Run:
    cfg = DPOConfig(data=DataConfig(seed=data_seed), train=TrainConfig(seed=train_seed, batch_size=2))
    return Run(cfg=cfg, train=cfg.train, train_feats=list(range(40)), eval_feats=[], tokenizer=None, device=None,
               world=1, rank=0, steps=10, start=0, engine=None, reporter=None, metrics={}, resumed_extra={})


def test_the_training_order_follows_train_seed_not_data_seed():
    orders = {(t, d): [run_with(t, d).batch_indices(step) for step in range(20)] for t in (0, 1) for d in (0, 5)}
    assert orders[(0, 0)] == orders[(0, 5)] and orders[(1, 0)] == orders[(1, 5)]
    assert orders[(0, 0)] != orders[(1, 0)]
    assert orders[(1, 0)] == [step_batches(40, 2, 1, 1, 0, step, 1) for step in range(20)]


def test_step_batches_cover_each_epoch_once_and_are_a_function_of_the_step():
    epoch = [i for step in range(10) for batch in step_batches(40, 2, 2, 1, 0, step, 3) for i in batch]
    assert sorted(epoch) == list(range(40))
    assert step_batches(40, 2, 2, 1, 0, 7, 3) == step_batches(40, 2, 2, 1, 0, 7, 3)  # a resume draws the same
    ranks = [step_batches(40, 2, 1, 2, r, 4, 3) for r in (0, 1)]  # two ranks split one step's examples
    assert not set(ranks[0][0]) & set(ranks[1][0])


class Prompts(list):
    def prompts(self, picked):
        return [self[i] for i in picked]


def test_ppo_prompt_draw_follows_train_seed():
    prompts = Prompts(range(50))
    draw = {(t, d): [iteration_prompts(PPOConfig(data=DataConfig(seed=d), train=TrainConfig(seed=t),
                                                 prompts_per_iter=8), prompts, it) for it in range(3)]
            for t in (0, 1) for d in (0, 5)}
    assert draw[(0, 0)] == draw[(0, 5)] and draw[(0, 0)] != draw[(1, 0)]


def test_the_held_out_split_is_drawn_by_data_seed():
    held = {d: stage_examples(DataConfig(task_size=60, eval_size=8, seed=d), "prompt")[1] for d in (0, 5)}
    assert [p.source for p in held[0]] != [p.source for p in held[5]]


@pytest.mark.parametrize("own_seed_value, expected", [(None, 4), (9, 9)])
def test_own_sample_draw_defaults_to_train_seed(own_seed_value, expected):
    overrides = ["pairs=own", "train.seed=4"] + ([f"own.seed={own_seed_value}"] if own_seed_value is not None else [])
    cfg = load_config(DPOConfig, overrides=overrides)
    assert own_seed(cfg) == expected and own_key(cfg)["own"]["seed"] == expected
    other = load_config(DPOConfig, overrides=[o.replace("train.seed=4", "train.seed=5") for o in overrides])
    assert (own_key(other) == own_key(cfg)) == (own_seed_value is not None)  # saved pairs are redrawn on a new seed
