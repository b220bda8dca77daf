"""DPO on the policy's own samples (``dpo.pairs: own``): sample n answers per prompt from the stage's input
policy, score each with the task's checker (or ``own.reward_model``, or ``own.rule``), and train on (best,
worst) pairs of each prompt.

This is what online / iterative DPO does: the pairs are answers the policy itself gives, so DPO moves
probability from its own mistakes to its own successes (the task's constructed pairs contrast a reference
answer with a corrupted one, which the policy may never produce). A prompt whose answers all score the same
teaches nothing and gives no pair; ``build_pairs`` is pure and tested, ``sample_pairs`` is the Ray shell.
"""

from __future__ import annotations

import logging
import random

from unipipe_ray.data.records import PreferencePair, PromptExample

log = logging.getLogger(__name__)


def build_pairs(prompts: list[PromptExample], answers: list[list[str]], scores: list[list[float]],
                seed: int = 0, source: str = "own") -> tuple[list[PreferencePair], dict]:
    """One (best, worst) pair per prompt whose answers do not all score the same; ties within the best or the
    worst score are broken by a draw seeded by (seed, prompt index). Returns (pairs, statistics)."""
    if not (len(prompts) == len(answers) == len(scores)):
        raise ValueError(f"{len(prompts)} prompts, {len(answers)} answer lists, {len(scores)} score lists")
    pairs, ties = [], 0
    for i, (prompt, texts, marks) in enumerate(zip(prompts, answers, scores, strict=True)):
        if len(texts) != len(marks) or len(texts) < 2:
            raise ValueError(f"prompt {i}: {len(texts)} answers and {len(marks)} scores (need >= 2 of each)")
        best, worst = max(marks), min(marks)
        if best == worst:
            ties += 1
            continue
        rng = random.Random(seed * 1_000_003 + i)
        chosen = rng.choice([j for j, m in enumerate(marks) if m == best])
        rejected = rng.choice([j for j, m in enumerate(marks) if m == worst])
        pairs.append(PreferencePair(prompt=prompt.prompt, chosen=texts[chosen], rejected=texts[rejected],
                                    source=source, meta={"chosen_score": best, "rejected_score": worst,
                                                         "prompt_index": i}))
    n = len(prompts)
    stats = {"prompts": n, "pairs": len(pairs), "all_tied": ties,
             "pair_share": len(pairs) / n if n else 0.0,
             "mean_score": sum(sum(m) for m in scores) / max(1, sum(len(m) for m in scores))}
    return pairs, stats


def _sample(engine: str, model_path: str, prompt_ids: list[list[int]], n: int, max_new_tokens: int,
            temperature: float, seed: int, reward_model: str | None = None, pad_id: int = 0) -> tuple:
    """Runs as a Ray task on a node with the stage's resources: (n response token lists per prompt, the reward
    model's score of each answer in the same shape, or None without one)."""
    from unipipe_ray.ppo.rollout import make_rollout_engine

    samples = make_rollout_engine(engine, model_path, seed=seed).generate(
        prompt_ids, n, max_new_tokens, temperature=temperature, seed=seed)
    per_prompt = lambda flat: [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]  # noqa: E731
    scores = None
    if reward_model:
        from unipipe_ray.ppo.roles import RewardScorer

        scores = per_prompt(RewardScorer(reward_model, pad_id, seed=seed).score(samples))
    return [[s.response_ids for s in group] for group in per_prompt(samples)], scores


def own_key(cfg) -> dict:
    """What the sampled pairs depend on: a re-run with the same key reuses them (and a resume trains on the
    very pairs it started with)."""
    from unipipe_ray.config import to_dict

    return {"model": cfg.model, "own": to_dict(cfg.own) | {"seed": own_seed(cfg)}, "data": to_dict(cfg.data)}


def own_seed(cfg) -> int:
    """The draw's seed: ``own.seed``, else the stage's training seed (so a run's seed varies its pairs too)."""
    return cfg.train.seed if cfg.own.seed is None else cfg.own.seed


def _scorer(cfg):
    """score(prompt example, answer text, answer token ids) -> float: ``own.rule``, else the task's checker;
    None when ``own.reward_model`` scores (inside the sampling task, where the answers are)."""
    from unipipe_ray.data.stage_data import make_task
    from unipipe_ray.ppo.rewards import load_rule

    if cfg.own.rule:
        return load_rule(cfg.own.rule, key="own.rule")
    if cfg.own.reward_model:
        return None  # the sampling task scores with it
    if cfg.data.sources:
        raise ValueError("dpo.pairs=own scores answers with a task's checker: set data.task (arith, gsm8k), "
                         "own.reward_model or own.rule, not data.sources alone")
    task = make_task(cfg.data)
    if not task.has_gold_reward:
        raise ValueError(f"dpo.pairs=own: task {cfg.data.task!r} has no checker to score answers with "
                         "(set own.reward_model or own.rule)")
    return lambda example, text, ids: task.gold_reward(example, text)


def sample_pairs(cfg, tokenizer, output_dir) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    """(train pairs, held-out pairs, statistics) sampled from ``cfg.model`` on the prompts of ``cfg.data``,
    scored by its task's checker; kept in ``<output_dir>/own_pairs.json`` and reused while ``own_key`` holds."""
    import dataclasses
    import json
    from pathlib import Path

    import ray

    from unipipe_ray.core.models import shareable_model
    from unipipe_ray.data.stage_data import stage_examples
    from unipipe_ray.data.tokenize import prompt_ids
    from unipipe_ray.runtime.files import write_json_atomic
    from unipipe_ray.runtime.logs import progress

    path = Path(output_dir) / "own_pairs.json"
    key = own_key(cfg)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            progress(f"dpo: reusing the {saved['stats']['pairs']} own-sample pairs in {path}")
            load = lambda rows: [PreferencePair(**{**r, "prompt": tuple(r["prompt"])}) for r in rows]  # noqa: E731
            return load(saved["train"]), load(saved["eval"]), saved["stats"]
    own, seed = cfg.own, own_seed(cfg)
    score = _scorer(cfg)  # before sampling: a bad rule or a task without a checker stops here
    train_prompts, eval_prompts = stage_examples(cfg.data, "prompt")
    eval_prompts = eval_prompts[:own.eval_prompts] if own.eval_prompts is not None else eval_prompts
    resources = {"num_gpus": 1} if cfg.train.use_gpu else {"num_cpus": 1}
    sampler = ray.remote(**resources)(_sample)
    model = shareable_model(cfg.model)
    reward_model = shareable_model(own.reward_model) if own.reward_model else None
    out, stats = [], {}
    for split, prompts in (("train", train_prompts), ("eval", eval_prompts)):
        responses, scores = [], []  # no prompts (eval_prompts: 0, eval_size: 0): no pairs, nothing to sample
        if prompts:
            progress(f"dpo: sampling {own.samples} answers to each of {len(prompts)} {split} prompts from "
                     f"{cfg.model}")
            ids = [prompt_ids(p.prompt, tokenizer) for p in prompts]
            responses, scores = ray.get(sampler.remote(own.engine, model, ids, own.samples, own.max_new_tokens,
                                                       own.temperature, seed + (split == "eval"), reward_model,
                                                       tokenizer.pad_token_id))
        answers = [[tokenizer.decode(r, skip_special_tokens=True) for r in rs] for rs in responses]
        if score is not None:
            scores = [[float(score(p, a, r)) for a, r in zip(texts, rs, strict=True)]
                      for p, texts, rs in zip(prompts, answers, responses, strict=True)]
        pairs, split_stats = build_pairs(prompts, answers, scores, seed=seed, source=f"own:{split}")
        out.append(pairs)
        stats |= {f"{split}_{k}": v for k, v in split_stats.items()}
        stats[f"{split}_tokens_generated"] = sum(len(r) for rs in responses for r in rs)  # the sampling's compute
        progress(f"dpo: {split}: {len(pairs)} pairs from {len(prompts)} prompts ({split_stats['all_tied']} with "
                 f"answers all scored the same; mean checker score {split_stats['mean_score']:.3f})")
    if not out[0]:
        raise ValueError(f"dpo.pairs=own: no prompt of {len(train_prompts)} gave answers that score differently "
                         "(raise own.samples or own.temperature, or start from a model that solves some)")
    stats["pairs"] = len(out[0])
    rows = lambda pairs: [dataclasses.asdict(p) for p in pairs]  # noqa: E731
    write_json_atomic(path, {"key": key, "stats": stats, "train": rows(out[0]), "eval": rows(out[1])})
    return out[0], out[1], stats


def own_features(cfg, address: str | None = None) -> tuple[list, list, dict]:
    """(train features, eval features, statistics) for ``run_dpo(own=...)``: the pairs sampled and scored
    (``sample_pairs``), tokenized as the stage's data would be."""
    from unipipe_ray.core.models import load_tokenizer
    from unipipe_ray.data.tokenize import tokenize_all
    from unipipe_ray.runtime.cluster import init_ray

    init_ray(address)
    tokenizer = load_tokenizer(cfg.model)
    train, held_out, stats = sample_pairs(cfg, tokenizer, cfg.output_dir)
    data = cfg.data
    features = [tokenize_all(pairs, "preference", tokenizer, data.max_length, data.on_bad_record,
                             max_prompt_length=data.max_prompt_length) for pairs in (train, held_out)]
    return features[0], features[1], stats
