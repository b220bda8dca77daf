"""The sweep's pieces without Ray: the budget split of the data stages, the sweep YAML, a trial's pipeline,
how many trials fit side by side."""

import pytest

from unipipe_ray.config import ConfigError, DataConfig, load_config
from unipipe_ray.data.stage_data import stage_examples
from unipipe_ray.tune.config import TuneConfig
from unipipe_ray.tune.run import base_tree, concurrency, param_space, trial_demand
from unipipe_ray.tune.trainable import split_counts, trial_config, trial_key

SWEEP = """
name: t
base:
  model: tiny
  eval_size: 6
  sft: {data: {task: arith, task_size: 60, eval_size: 6}}
  dpo: {data: {task: arith, task_size: 60, eval_size: 6}}
space:
  budget: {grid: [10, 20]}
  sft_ratio: {grid: [1.0, 0.25, 0.0]}
  seed: {grid: [0, 1]}
"""


@pytest.fixture
def sweep(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return path


def prompts(examples):
    return [ex.prompt[0]["content"] for ex in examples]


def test_a_budget_gives_sft_and_preference_stages_disjoint_questions_and_leaves_the_held_out_set_alone():
    data = DataConfig(task="arith", task_size=60, eval_size=6, budget=20, sft_ratio=0.25, budget_seed=3)
    sft, sft_eval = stage_examples(data, "sft")
    pref, pref_eval = stage_examples(data, "preference")
    assert (len(sft), len(pref)) == (5, 15)  # round(20 * 0.25) = 5 SFT examples, the other 15 pairs
    assert not set(prompts(sft)) & set(prompts(pref))
    # every SFT example's question and every pair's question come from the same 54-question training pool
    full_train, full_eval = stage_examples(DataConfig(task="arith", task_size=60, eval_size=6), "sft")
    assert set(prompts(sft)) | set(prompts(pref)) <= set(prompts(full_train))
    assert prompts(sft_eval) == prompts(pref_eval) == prompts(full_eval)
    # another budget seed draws other questions; the held-out set stays
    other = stage_examples(DataConfig(task="arith", task_size=60, eval_size=6, budget=20, sft_ratio=0.25), "sft")
    assert prompts(other[0]) != prompts(sft) and prompts(other[1]) == prompts(sft_eval)


def test_budget_errors_name_the_problem():
    with pytest.raises(ValueError, match="leaves no preference data"):
        stage_examples(DataConfig(task="arith", task_size=60, eval_size=6, budget=10, sft_ratio=1.0), "preference")
    with pytest.raises(ValueError, match="exceeds the 54 training questions"):
        stage_examples(DataConfig(task="arith", task_size=60, eval_size=6, budget=55), "sft")
    with pytest.raises(ConfigError, match="budget or size"):
        DataConfig(budget=10, size=5)
    with pytest.raises(ConfigError, match="sft_ratio"):
        DataConfig(budget=10, sft_ratio=1.5)


def test_the_sweep_yaml_is_validated_with_the_key_named(sweep):
    cfg = load_config(TuneConfig, sweep)
    assert cfg.base.stages == ("sft", "dpo")
    nested = load_config(TuneConfig, sweep, ["space.dpo.beta={grid: [0.1, 0.5]}"])
    assert nested.space["dpo.beta"] == {"grid": [0.1, 0.5]}
    for override, message in [("space.dpo.bta={grid: [1]}", "space.dpo.bta: .*unknown key"),
                              ("space.dpo.beta={grid: [-1]}", "space.dpo.beta: .*must be > 0"),
                              ("space.dpo.beta={choice: [0.1]}", "needs search: random"),
                              ("space.budget={uniform: [1]}", r"needs \[low, high\]"),
                              ("base.stages=[sft, ppo]", "base.stages"),
                              ("scheduler=hyperband", "scheduler"),
                              ("base.eval_size=7", "base.eval_size: 7 is more than the 6")]:
        with pytest.raises(ConfigError, match=message):
            load_config(TuneConfig, sweep, [override])


def test_the_search_space_becomes_tune_samplers(sweep):
    from ray import tune

    space = param_space(load_config(TuneConfig, sweep, ["search=random", "space.dpo.beta={loguniform: [0.01, 1]}"]))
    assert space["budget"] == {"grid_search": [10, 20]}
    assert isinstance(space["dpo.beta"], tune.search.sample.Float)


def test_a_trial_pipeline_applies_the_split_the_seed_and_drops_an_empty_stage(sweep):
    base = base_tree(load_config(TuneConfig, sweep))
    mixed = trial_config(base, {"budget": 20, "sft_ratio": 0.25, "seed": 1, "dpo.beta": 0.5}, "/tmp/x")
    assert mixed.stages == ("sft", "dpo") and mixed.dpo.beta == 0.5 and mixed.run_dir == "/tmp/x"
    for section in (mixed.sft, mixed.dpo):
        assert (section.data.budget, section.data.sft_ratio, section.data.budget_seed) == (20, 0.25, 1)
        assert section.train.seed == 1 and section.train.cpus_per_worker == 0.9
    assert trial_config(base, {"budget": 20, "sft_ratio": 0.0, "seed": 0}, "x").stages == ("dpo",)
    assert trial_config(base, {"budget": 20, "sft_ratio": 1.0, "seed": 0}, "x").stages == ("sft",)
    assert trial_config(base, {"budget": 100, "sft_ratio": 0.01, "seed": 0}, "x").stages == ("sft", "dpo")
    assert split_counts(100, 0.01) == (1, 99) and split_counts(10, 0.25) == (3, 7)  # 2.5 rounds up
    shared = trial_config(base, {"budget": 20, "sft_ratio": 0.5}, "/s/t1", "/s/data_cache")
    assert shared.sft.data.cache_dir == shared.dpo.data.cache_dir == "/s/data_cache"  # one cache per sweep
    assert mixed.sft.data.cache_dir is None  # none given: each stage's default
    with pytest.raises(ConfigError, match="base.dpo.data.task_size: must equal base.sft.data.task_size"):
        trial_config({**base, "dpo": {**base["dpo"], "data": {**base["dpo"]["data"], "task_size": 70}}},
                     {"budget": 20, "sft_ratio": 0.5}, "x")
    assert trial_key({"sft_ratio": 0.5, "budget": 20, "dpo.sams.encoder": "a/b"}) == \
        "budget=20_dpo.sams.encoder=a-b_sft_ratio=0.5"


def test_trials_fit_side_by_side_and_one_that_never_fits_is_an_error(sweep):
    cfg = load_config(TuneConfig, sweep)
    assert trial_demand(cfg) == (pytest.approx(0.91), 0)
    assert concurrency(cfg, {"CPU": 2}) == 2  # two trials of one 0.9-CPU worker on two cores
    assert concurrency(cfg, {"CPU": 16}) == 17  # floor(16 / 0.91)
    assert concurrency(load_config(TuneConfig, sweep, ["max_concurrent_trials=1"]), {"CPU": 8}) == 1
    two_workers = load_config(TuneConfig, sweep, ["base.sft.train.num_workers=2"])
    assert concurrency(two_workers, {"CPU": 2}) == 1
    with pytest.raises(ValueError, match="one trial needs 2.71 CPU"):
        concurrency(load_config(TuneConfig, sweep, ["base.dpo.train.num_workers=3"]), {"CPU": 2})
    gpu = load_config(TuneConfig, sweep, ["base.sft.train.use_gpu=true", "base.dpo.train.use_gpu=true"])
    assert concurrency(gpu, {"CPU": 16, "GPU": 8}) == 8


def test_the_shipped_sweeps_load_and_the_jobs_point_at_them():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    configs = sorted((root / "tune_configs").glob("*.yaml"))
    assert {"allocation.yaml", "sams.yaml"} <= {p.name for p in configs}
    for path in configs:
        load_config(TuneConfig, path)  # raises, naming the file and key, on any bad entry
    for job, config in (("tune_allocation.py", "allocation.yaml"), ("tune_sams.py", "sams.yaml")):
        assert f'DEFAULT = "tune_configs/{config}"' in (root / "jobs" / job).read_text()


def test_interim_results_carry_the_held_out_pair_accuracy_under_the_final_name():
    from unipipe_ray.tune.trainable import interim_metrics

    out = interim_metrics("dpo", 25, {"dpo/loss": 0.6, "dpo/eval_loss": 0.65, "dpo/eval_rewards_accuracy": 0.7,
                                      "step": 25})
    assert out == {"stage": "dpo-step", "step": 25, "dpo/eval_loss": 0.65, "dpo/eval_rewards_accuracy": 0.7,
                   "pref_accuracy": 0.7}


def test_a_dpo_only_trial_is_scored_on_its_own_data_split(sweep):
    """A SamS search runs DPO alone and sets only dpo.data; the unused sft section must not pick the set."""
    from unipipe_ray.data.held_out import pipeline_held_out as held_out

    base = base_tree(load_config(TuneConfig, sweep, ["base.stages=[dpo]", "base.dpo.data.task_size=50",
                                                     "base.dpo.data.seed=7", "space={dpo.beta: {grid: [0.1]}}"]))
    task, examples, pairs = held_out(trial_config(base, {"dpo.beta": 0.1}, "x"))
    expected = stage_examples(DataConfig(task="arith", task_size=50, eval_size=6, seed=7), "sft")[1]
    assert prompts(examples) == prompts(expected) and prompts(pairs) == prompts(expected)
    assert task.seed == 7 and len(task.problems) == 50


def test_a_share_smaller_than_one_batch_trains_in_one_smaller_batch(sweep):
    """budget 20 at r = 0.1: 2 SFT examples under a batch of 4 x 2 accumulation -> batch 1 x accum 2; DPO's 18
    pairs fill its batch of 4 and keep it. At r = 0.01 of 100 one example is left: batch 1, accum 1."""
    base = base_tree(load_config(TuneConfig, sweep, ["base.sft.train.batch_size=4", "base.sft.train.grad_accum=2",
                                                     "base.dpo.train.batch_size=4", "base.sft.data.task_size=200",
                                                     "base.dpo.data.task_size=200"]))
    cfg = trial_config(base, {"budget": 20, "sft_ratio": 0.1}, "x")
    assert (cfg.sft.train.batch_size, cfg.sft.train.grad_accum, cfg.dpo.train.batch_size) == (1, 2, 4)
    cfg = trial_config(base, {"budget": 100, "sft_ratio": 0.01}, "x")
    assert (cfg.sft.train.batch_size, cfg.sft.train.grad_accum) == (1, 1)
    with pytest.raises(ConfigError, match="base.sft.train.num_workers: 2 workers cannot share the 1 example"):
        trial_config({**base, "sft": {**base["sft"], "train": {**base["sft"]["train"], "num_workers": 2}}},
                     {"budget": 100, "sft_ratio": 0.01}, "x")


def test_budget_keys_that_would_silently_do_nothing_are_refused(sweep):
    with pytest.raises(ConfigError, match="space.sft_ratio: needs a budget"):
        load_config(TuneConfig, sweep, ["space={sft_ratio: {grid: [0.5]}, dpo.beta: {grid: [0.1]}}"])
    assert load_config(TuneConfig, sweep, ["storage_path=s3://bucket/tune"]).storage_path == "s3://bucket/tune"
    # a budget set in the base (not searched) still splits the pool and drops an empty stage
    base = base_tree(load_config(TuneConfig, sweep, ["base.sft.data.budget=10", "base.dpo.data.budget=10",
                                                     "space={sft_ratio: {grid: [0.0, 1.0]}}"]))
    assert trial_config(base, {"sft_ratio": 0.0}, "x").stages == ("dpo",)
    with pytest.raises(ConfigError, match="base.dpo.data.budget: must equal base.sft.data.budget"):
        trial_config({**base, "dpo": {**base["dpo"], "data": {**base["dpo"]["data"], "budget": 12}}},
                     {"sft_ratio": 0.5}, "x")


def test_relative_paths_are_made_absolute_for_the_trials(sweep, tmp_path, monkeypatch):
    """Tune runs every trial in its own directory: a relative data file or model directory would miss."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    tree = base_tree(load_config(TuneConfig, sweep, ["base.model=models/base", "base.sft.data.task=gsm8k",
                                                     "base.sft.data.task_path=data/train.jsonl"]))
    assert tree["model"] == str(tmp_path / "models" / "base")
    assert tree["sft"]["data"]["task_path"] == str(tmp_path / "data" / "train.jsonl")
    assert tree["dpo"]["model"] == "smollm2-135m"  # a model spec, not a path: left alone
