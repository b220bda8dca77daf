"""DPO on the policy's own samples: the pair builder (pure), the saved pairs reused only for the same inputs,
and the config's checks. The sampling through Ray is tests/ray/test_own_pairs_ray.py."""

import dataclasses
import json

import pytest

from unipipe_ray.config import ConfigError, DPOConfig, load_config
from unipipe_ray.data.records import PromptExample
from unipipe_ray.pipeline import own_pairs
from unipipe_ray.pipeline.own_pairs import build_pairs


def prompts(n):
    return [PromptExample(prompt=({"role": "user", "content": f"q{i}"},), source=f"t:{i}") for i in range(n)]


def test_a_pair_comes_only_from_a_prompt_with_a_better_and_a_worse_answer():
    answers = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    scores = [[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    pairs, stats = build_pairs(prompts(3), answers, scores)
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a")]  # the best against the worst
    assert pairs[0].prompt == prompts(1)[0].prompt and pairs[0].meta == {
        "chosen_score": 1.0, "rejected_score": 0.0, "prompt_index": 0}
    assert stats == {"prompts": 3, "pairs": 1, "all_tied": 2, "pair_share": 1 / 3, "mean_score": 4.5 / 9}


def test_ties_within_the_best_or_the_worst_are_broken_by_the_seed():
    answers, scores = [["w1", "w2", "b1", "b2", "w3"]] * 40, [[0.0, 0.0, 1.0, 1.0, 0.0]] * 40
    first = build_pairs(prompts(40), answers, scores, seed=1)[0]
    assert [(p.chosen, p.rejected) for p in first] == [(p.chosen, p.rejected)
                                                       for p in build_pairs(prompts(40), answers, scores, seed=1)[0]]
    assert {p.chosen for p in first} == {"b1", "b2"} and {p.rejected for p in first} == {"w1", "w2", "w3"}
    other = build_pairs(prompts(40), answers, scores, seed=2)[0]
    assert [p.chosen for p in other] != [p.chosen for p in first]  # another seed, other picks


def test_inconsistent_inputs_are_refused():
    with pytest.raises(ValueError, match="2 prompts, 1 answer lists"):
        build_pairs(prompts(2), [["a", "b"]], [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="prompt 0: 1 answers"):
        build_pairs(prompts(1), [["a"]], [[1.0]])


def test_saved_pairs_are_reused_for_the_same_inputs_only(tmp_path, monkeypatch):
    cfg = load_config(DPOConfig, overrides=["pairs=own", f"output_dir={tmp_path}", "data.task=arith"])
    pair = build_pairs(prompts(1), [["good", "bad"]], [[1.0, 0.0]])[0][0]
    row = {**dataclasses.asdict(pair), "prompt": list(pair.prompt)}
    saved = {"key": own_pairs.own_key(cfg), "stats": {"pairs": 1}, "train": [row], "eval": []}
    (tmp_path / "own_pairs.json").write_text(json.dumps(saved))
    train, held_out, stats = own_pairs.sample_pairs(cfg, tokenizer=None, output_dir=tmp_path)
    assert train == [pair] and held_out == [] and stats == {"pairs": 1}

    class Resampled(Exception):
        pass

    def resample(cfg):
        raise Resampled
    monkeypatch.setattr(own_pairs, "_scorer", resample)
    for change in ("own.temperature=0.7", "data.max_length=64", "model=tiny"):
        changed = load_config(DPOConfig, overrides=["pairs=own", f"output_dir={tmp_path}", "data.task=arith", change])
        with pytest.raises(Resampled):
            own_pairs.sample_pairs(changed, tokenizer=None, output_dir=tmp_path)


def test_the_config_says_what_is_wrong():
    with pytest.raises(ConfigError, match="samples"):
        load_config(DPOConfig, overrides=["pairs=own", "own.samples=1"])
    with pytest.raises(ConfigError, match="own.eval_prompts"):
        load_config(DPOConfig, overrides=["pairs=own", "own.eval_prompts=-1"])
    with pytest.raises(ConfigError, match="pairs"):
        load_config(DPOConfig, overrides=["pairs=mine"])
    with pytest.raises(ConfigError, match="data.budget splits constructed pairs"):
        load_config(DPOConfig, overrides=["pairs=own", "data.budget=8"])
    with pytest.raises(ConfigError, match="own.rule"):
        own_pairs._scorer(load_config(DPOConfig, overrides=["pairs=own", "own.rule=no_such_module:f"]))


def test_run_dpo_refuses_own_pairs_it_was_not_given():
    from unipipe_ray.stages.dpo import run_dpo

    with pytest.raises(ValueError, match="pairs sampled by pipeline/own_pairs.py"):
        run_dpo(load_config(DPOConfig, overrides=["pairs=own"]))


def test_in_a_chain_the_reward_model_scores_own_pairs_only_where_no_checker_can(tmp_path):
    from unipipe_ray.config import PipelineConfig
    from unipipe_ray.pipeline.chain import stage_config

    def dpo(*overrides, given=()):
        cfg = load_config(PipelineConfig, overrides=[f"run_dir={tmp_path}", "dpo.pairs=own", *overrides])
        return stage_config(cfg, "dpo", {"sft": "S", "rm": "R", "ppo": "P"}, set(given)).own

    src = f"dpo.data.sources=[{{path: {tmp_path / 'prompts.jsonl'}}}]"
    assert dpo(src).reward_model == "R"               # user prompts: no checker, the chain's RM scores
    assert dpo().reward_model is None                 # arith: its checker scores
    assert dpo("dpo.data.task=hh_harmless", "dpo.data.task_path=x").reward_model == "R"
    assert dpo(src, "dpo.own.reward_model=mine", given={"dpo.own.reward_model"}).reward_model == "mine"
    assert dpo(src, "dpo.own.rule=m:f").reward_model is None
    with pytest.raises(ConfigError, match="rule or reward_model, not both"):
        load_config(DPOConfig, overrides=["own.rule=m:f", "own.reward_model=R"])
