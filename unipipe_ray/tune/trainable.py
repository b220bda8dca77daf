"""One trial of a sweep: a small pipeline (SFT -> DPO, or one of them) on the trial's settings, then the
held-out metrics after each stage.

Allocation trials (docs/allocation.md) take three keys: ``budget`` N, ``sft_ratio`` r and ``seed``. Both stages
read the same task pool; ``data.budget`` makes the SFT stage take round(N * r) questions and the DPO stage
the other N - round(N * r), disjoint (data.split.budget_split). DPO's reference is its input: the SFT model,
or the base model when r = 0 (then there is no SFT stage). Every other space key is a dotted override of
the base pipeline (``dpo.keep_ratio``, ``dpo.sams.lr``, ...).

Each trial is a pipeline run in ``<experiment>/stages/<trial key>_<trial id>/`` with its manifest, so a trial
that errored and is resumed (``Tuner.restore``) skips its finished stages.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path

from unipipe_ray.config import ConfigError, PipelineConfig, build_config, set_dotted
from unipipe_ray.core import storage

POOL_KEYS = ("task", "task_path", "task_size", "sources", "eval_size", "seed")  # what makes the shared pool


def split_counts(budget: int, ratio: float) -> tuple[int, int]:
    """(SFT examples, preference pairs) of a budget, as budget_split gives them to the data stages."""
    from unipipe_ray.data.split import sft_count

    n_sft = sft_count(budget, ratio)
    return n_sft, budget - n_sft


def trial_key(params: dict) -> str:
    """A directory name for a trial's parameters, the same on every run: sorted key=value, safe characters."""
    text = "_".join(f"{k}={params[k]}" for k in sorted(params))
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", text)[:200]


def trial_config(base: dict, params: dict, run_dir: str, cache_dir: str | None = None) -> PipelineConfig:
    """The pipeline one trial runs: the base (a ``to_dict`` tree) with the trial's parameters applied.
    ``cache_dir``: the sweep's tokenized-data cache, for stages that name none (the trials' splits differ,
    their tokenized sources do not, so one trial tokenizes and the others reuse)."""
    tree = copy.deepcopy(base)
    for stage in ("sft", "rm", "ppo", "dpo"):
        if cache_dir and stage in tree and not tree[stage].get("data", {}).get("cache_dir"):
            set_dotted(tree, f"{stage}.data.cache_dir", cache_dir)
    for key, value in params.items():
        if key == "budget":
            for stage in ("sft", "dpo"):
                set_dotted(tree, f"{stage}.data.budget", value)
                set_dotted(tree, f"{stage}.data.size", None)
        elif key == "sft_ratio":
            for stage in ("sft", "dpo"):
                set_dotted(tree, f"{stage}.data.sft_ratio", value)
        elif key == "seed":  # which questions the budget draws, and the training seed; the held-out set stays
            for stage in ("sft", "dpo"):
                set_dotted(tree, f"{stage}.data.budget_seed", value)
                set_dotted(tree, f"{stage}.train.seed", value)
        else:
            set_dotted(tree, key, value)
    tree.update(run_dir=run_dir, report=False)
    cfg = build_config(PipelineConfig, tree)
    budget = cfg.sft.data.budget
    if budget is None and cfg.dpo.data.budget is None:
        return cfg
    for key in POOL_KEYS:  # disjointness only holds when both stages index the same pool
        if getattr(cfg.sft.data, key) != getattr(cfg.dpo.data, key):
            raise ConfigError(f"base.dpo.data.{key}", f"must equal base.sft.data.{key} in a budget sweep (one "
                              f"pool split between SFT and DPO), got {getattr(cfg.dpo.data, key)!r} vs "
                              f"{getattr(cfg.sft.data, key)!r}")
    for key in ("budget", "sft_ratio", "budget_seed"):
        if getattr(cfg.sft.data, key) != getattr(cfg.dpo.data, key):
            raise ConfigError(f"base.dpo.data.{key}", f"must equal base.sft.data.{key}: both stages take their "
                              "share of one budget (set budget, sft_ratio and seed in the space instead)")
    n_sft, n_pref = split_counts(budget, cfg.sft.data.sft_ratio)
    stages = tuple(s for s in cfg.stages if (s == "sft" and n_sft) or (s == "dpo" and n_pref))
    shares = {"sft": n_sft, "dpo": n_pref}
    return dataclasses.replace(cfg, stages=stages, **{s: fit_batch(getattr(cfg, s), shares[s], s) for s in stages})


def fit_batch(section, n: int, stage: str):
    """A share smaller than one optimizer step (batch_size x grad_accum x workers: r = 0.01 of a small budget)
    trains in steps of the whole share instead of failing: the batch shrinks to what the share fills."""
    train = section.train
    if n >= train.batch_size * train.grad_accum * train.num_workers:
        return section
    if n < train.num_workers:
        raise ConfigError(f"base.{stage}.train.num_workers", f"{train.num_workers} workers cannot share the "
                          f"{n} example(s) this trial's budget gives {stage}")
    accum = min(train.grad_accum, n // train.num_workers)
    batch = n // (accum * train.num_workers)
    return dataclasses.replace(section, train=dataclasses.replace(train, batch_size=batch, grad_accum=accum))


def evaluate_policy(cfg: PipelineConfig, model: str, ref: str | None, engine: str = "hf") -> dict:
    """Held-out figures of one policy: answer accuracy (task checker) with its 95% interval, the share of
    answers missing the "#### n" line, and with a reference the DPO implicit-reward accuracy on pairs."""
    from unipipe_ray.data.answers import extract_answer
    from unipipe_ray.data.held_out import pipeline_held_out
    from unipipe_ray.eval.evaluate import evaluate_generations, generate_completions, implicit_reward_accuracy

    task, examples, pairs = pipeline_held_out(cfg)
    completions = generate_completions(model, examples, cfg.eval_max_new_tokens, engine=engine, progress=False)
    misses = sum(extract_answer(c) is None for c in completions)
    out = {"n_eval": len(examples), "format_miss": misses / len(examples), "format_miss_count": misses}
    figures = evaluate_generations(completions, examples, task)
    if ref is not None and pairs:
        figures["pref_accuracy"] = implicit_reward_accuracy(model, ref, pairs, cfg.dpo.beta, progress=False)
    for name, key in (("exact_match", "accuracy"), ("pref_accuracy", "pref_accuracy"), ("rougeL", "rougeL")):
        if name in figures:
            e = figures[name]
            out.update({key: e["estimate"], f"{key}_low": e["low"], f"{key}_high": e["high"]})
    return out


def _remote_eval(resources: dict):
    """evaluate_policy as a Ray task outside the trial's placement group (Tune would capture it there, and
    that group holds only the trial actor's 0.01 CPU)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(evaluate_policy).options(
        **resources, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))


def run_trial(cfg: PipelineConfig, given: set[str], engine: str = "hf", fail_before: str | None = None,
              address: str | None = None, eval_resources: dict | None = None) -> Iterator[dict]:
    """Run the trial's stages one at a time; after each, yield its model's held-out metrics (one Tune report
    per stage; the last one carries ``final: True``). ``eval_resources`` (e.g. {"num_cpus": 0.9,
    "num_gpus": 1}): evaluate in a Ray task holding what the stage's workers just released (the trial actor
    holds 0.01 CPU and no GPU); None: in this process. ``fail_before`` (tests) raises before that stage."""
    import ray

    from unipipe_ray.core.models import resolve_model
    from unipipe_ray.pipeline.manifest import Manifest
    from unipipe_ray.pipeline.run import run_pipeline

    started = time.time()
    data = cfg.sft.data
    counts = split_counts(data.budget, data.sft_ratio) if data.budget is not None else (None, None)
    if not cfg.stages:
        raise ValueError("the trial has no stage to run")
    for i, stage in enumerate(cfg.stages):
        if stage == fail_before:
            raise RuntimeError(f"injected failure before {stage}")
        out = run_pipeline(dataclasses.replace(cfg, stages=cfg.stages[:i + 1]), given, address)
        entry = Manifest(Path(out["run_dir"])).stage(stage)
        ref = None
        if stage == "dpo":
            ref = str(resolve_model(entry["config"]["ref_model"] or entry["config"]["model"]))
        metrics = {k: v for k, v in (entry.get("metrics") or {}).items() if isinstance(v, (int, float))}
        args = (cfg, out["checkpoints"][stage], ref, engine)
        held_out_metrics = (ray.get(_remote_eval(eval_resources).remote(*args)) if eval_resources
                            else evaluate_policy(*args))
        yield {"stage": stage, **metrics, **held_out_metrics, "final": i == len(cfg.stages) - 1,
               "sft_examples": counts[0], "pref_pairs": counts[1], "seconds": round(time.time() - started, 1)}


def interim_metrics(stage: str, step: int, metrics: dict) -> dict:
    """A stage's periodic held-out evaluation as a Tune result: DPO's implicit-reward accuracy on the held-out
    pairs is the final report's ``pref_accuracy`` (from the same held-out split; the stage scores all
    ``data.eval_size`` pairs, the final report the first ``eval_size``), so ASHA can rank trials mid-stage."""
    out = {"stage": f"{stage}-step", "step": step,
           **{k: v for k, v in metrics.items() if "/eval_" in k and isinstance(v, (int, float))}}
    if "dpo/eval_rewards_accuracy" in metrics:
        out["pref_accuracy"] = metrics["dpo/eval_rewards_accuracy"]
    return out


def tune_trial(params: dict, base: dict, given: list[str], stages_root: str, metric: str, engine: str = "hf",
               eval_resources: dict | None = None, inject: dict | None = None) -> None:
    """The Tune function trainable: a thin shell over run_trial. Every result carries ``metric`` (Tune
    requires it): stage ends always; periodic evaluations inside a stage when they have it.
    ``inject`` (tests): {"params": {...}, "before": stage} fails the matching trial, before that stage."""
    from ray import tune

    from unipipe_ray.runtime.launch import eval_listener

    # Tune's trial id (kept on restore) tells repeats of the same parameters apart (num_samples > 1).
    name = f"{trial_key(params)}_{tune.get_context().get_trial_id()}"
    run_dir = storage.join(stages_root, name) if storage.is_uri(stages_root) else Path(stages_root) / name
    cache_dir = storage.join(stages_root, "data_cache") if storage.is_uri(stages_root) else str(
        Path(stages_root).resolve() / "data_cache")
    cfg = trial_config(base, params, str(run_dir), cache_dir)
    fail = inject["before"] if inject and all(params.get(k) == v for k, v in inject["params"].items()) else None
    reported = []

    def report(metrics: dict) -> None:
        if metric in metrics:
            tune.report(metrics)
            reported.append(metrics)

    with eval_listener(lambda stage, step, m: report(interim_metrics(stage, step, m))):
        for metrics in run_trial(cfg, set(given) | set(params), engine, fail_before=fail,
                                 eval_resources=eval_resources):
            report(metrics)
    if not reported:
        raise ValueError(f"no result of this trial has the sweep's metric {metric!r} (stages {list(cfg.stages)}; "
                         "accuracy needs a task with a checker, pref_accuracy a DPO stage)")
