"""PPO (RLHF) stage: a driver-side controller over Ray actor groups.

    rollout engines (hf | vllm) -> reward-model group + gold checker -> reference + critic -> advantages
    -> policy (and critic) updates -> weight sync to the engines -> metrics, reward-hacking watch

One iteration, top to bottom, is ``ppo_iteration``; ``run_ppo`` sets the groups up and loops. The rewards and
advantages are rewards.py, the actor groups and weight sync groups.py, the model roles roles.py. The KL
penalty to the reference is per token (``kl_estimator``), with a fixed or adaptive coefficient (Ziegler et
al. 2019).
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import torch

from unipipe_ray.config import PPOConfig, to_dict
from unipipe_ray.core import storage
from unipipe_ray.core.rl import AdaptiveKLController, FixedKLController, kl_penalty, logp_gap, old_logps_needed
from unipipe_ray.core.watch import HackingWatch
from unipipe_ray.ppo.groups import build_groups, join_weight_group, sync_weights
from unipipe_ray.ppo.rewards import advantages_and_returns, gold_scorer, load_rule, pad_rows, scalar_rewards
from unipipe_ray.runtime.files import recover_dir, replace_dir, write_json_atomic
from unipipe_ray.runtime.logs import progress

log = logging.getLogger(__name__)


def ppo_iteration(cfg: PPOConfig, groups: dict, prompts: list, task, tokenizer, kl_ctl, it: int, state,
                  specs=None, on_scored=None) -> tuple[dict, object]:
    """One PPO iteration over ``prompts`` (PromptExamples with their token ids). Returns (its metrics, the
    object-store weights the engines now hold, or None after a collective sync: ``state`` of the next
    iteration, which re-syncs an engine that Ray restarted). ``on_scored(gold_mean)`` runs once the rollouts
    are scored and before the update, while the trainers still hold the weights that sampled them."""
    import ray

    from unipipe_ray.runtime.actors import split

    t = {"start": time.perf_counter()}
    def restart(actor):  # a restarted engine has its initial weights: give it the current ones
        if specs is not None:
            raise RuntimeError("a rollout engine was restarted, and the collective weight group cannot take it "
                               "back; run the same command again to resume from the last checkpoint, or use "
                               "weight_sync: object_store")
        if state is not None:  # None: no sync yet, so its initial weights are the current ones
            ray.get(actor.load_weights.remote(state))

    # Seeded per iteration: a resumed run samples what the uninterrupted one would have.
    samples = groups["engines"].call_split("generate", [ids for _, ids in prompts], cfg.samples_per_prompt,
                                           cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                           cfg.train.seed * 1_000_003 + it, on_restart=restart)
    t["generate"] = time.perf_counter()
    n_gen = sum(len(s.response_ids) for s in samples)
    examples = [ex for ex, _ in prompts for _ in range(cfg.samples_per_prompt)]
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    gold_fn = gold_scorer(cfg, task)
    gold = [gold_fn(ex, text, s.response_ids) for ex, text, s in zip(examples, texts, samples, strict=True)] \
        if gold_fn else [0.0] * len(samples)
    proxy = groups["reward"].call_split("score", samples) if "reward" in groups else [0.0] * len(samples)
    rule_fn = load_rule(cfg.rule_reward)
    rule = [rule_fn(ex, text, s.response_ids) for ex, text, s in zip(examples, texts, samples, strict=True)] \
        if rule_fn else [0.0] * len(samples)
    rewards = scalar_rewards(cfg, proxy, gold, rule, [s.finished for s in samples])
    if on_scored is not None:
        on_scored(float(torch.tensor(gold).mean()))
    t["score"] = time.perf_counter()

    width = max(len(s.response_ids) for s in samples)
    mask = pad_rows([torch.ones(len(s.response_ids)) for s in samples], width).bool()
    shards = split(samples, len(groups["policy"]))
    in_loss = cfg.kl_in == "loss"
    # One optimizer step over every sample: the training forward gives the old log-probs (rl.old_logps_needed).
    old_logps = pad_rows(groups["policy"].call_each("logps", [(s,) for s in shards]), width) \
        if old_logps_needed(cfg.ppo_epochs, cfg.minibatch_size, [len(s) for s in shards], not in_loss) else None
    ref_logps = pad_rows(groups["reference"].call_split("logps", samples), width)
    values = pad_rows(groups["critic"].call_each("values", [(s,) for s in shards]), width) \
        if "critic" in groups else None
    kl = kl_penalty(old_logps, ref_logps, cfg.kl_estimator) * mask if old_logps is not None else None
    advantages, returns = advantages_and_returns(cfg, rewards, kl if not in_loss else torch.zeros_like(ref_logps),
                                                 0.0 if in_loss else kl_ctl.value, values, mask)
    t["prepare"] = time.perf_counter()

    bounds = [0]
    for s in shards:
        bounds.append(bounds[-1] + len(s))
    part = lambda x, k: x[bounds[k]:bounds[k + 1]] if x is not None else None
    per_worker = lambda a, b: [(shards[k], part(a, k), part(b, k), cfg.ppo_epochs, cfg.minibatch_size, it)
                               for k in range(len(shards))]
    kl_args = lambda k: (part(ref_logps, k), kl_ctl.value, cfg.kl_estimator) if in_loss else ()
    each = groups["policy"].call_each("update", [args + kl_args(k) for k, args in enumerate(
        per_worker(old_logps, advantages))])
    # the update's own check and KL are folded in below (sync_checks, kl_seq), not reported as they are
    metrics = {k: v for k, v in each[0].items() if k not in ("ppo/rollout_logp_max_diff", "ppo/kl_in_loss")}
    if values is not None:
        metrics |= groups["critic"].call_each("update", per_worker(values, returns))[0]
    t["train"] = time.perf_counter()
    state = sync_weights(groups, specs)
    metrics |= sync_checks(cfg, groups, samples, old_logps, [m.get("ppo/rollout_logp_max_diff") for m in each],
                           mask, it)
    t["sync"] = time.perf_counter()

    kl_seq = float(kl.sum(1).mean()) if kl is not None else each[0]["ppo/kl_in_loss"]
    kl_ctl.update(kl_seq, len(samples))
    seconds = {k: t[k] - t[prev] for prev, k in zip(list(t)[:-1], list(t)[1:], strict=True)}
    return metrics | {
        "ppo/reward_mean": float(torch.tensor(proxy).mean()), "ppo/reward_std": float(torch.tensor(proxy).std()),
        "ppo/gold_mean": float(torch.tensor(gold).mean()), "ppo/gold_std": float(torch.tensor(gold).std()),
        "ppo/rule_mean": float(torch.tensor(rule).mean()), "ppo/score_mean": float(rewards.mean()),
        # what the policy is pushed up on besides the gold reward: the watch's proxy
        "ppo/proxy_mean": float((torch.tensor(proxy) + torch.tensor(rule)).mean()),
        "ppo/proxy_std": float((torch.tensor(proxy) + torch.tensor(rule)).std()),
        "ppo/kl": kl_seq, "ppo/kl_coef": kl_ctl.value,
        "ppo/response_length": n_gen / len(samples), "ppo/rollout_tokens_per_s": n_gen / seconds["generate"],
        **{f"time/{k}_s": v for k, v in seconds.items()}}, state


def sync_checks(cfg: PPOConfig, groups: dict, samples: list, old_logps, update_gaps: list, mask, it: int) -> dict:
    """Did the engines get the trainer's weights? Two checks, as metrics:

    - ``ppo/rollout_logp_max_diff``, every iteration and free: the log-probs the engine reported for the tokens
      it sampled, against the trainer's for the same tokens on the same weights (the old log-probs, or the
      training forward when the update computed them: ``update_gaps``, one per trainer). It checks the sync
      before this iteration's generation. Only where the engine reports the trainer's kind of log-probs (the
      HF engine always; vLLM's are untempered and before top-p, so at temperature 1 and top-p 1).
    - ``ppo/engine_trainer_logp_max_diff``, after every ``sync_check_every``-th sync (every one when the free
      check cannot run): the engine scores 8 samples on the weights just synced and the trainer does too, a
      forward on each side."""
    import ray

    out = {}
    comparable = cfg.engine == "hf" or (cfg.temperature == 1.0 and cfg.top_p == 1.0)
    if comparable:
        out["ppo/rollout_logp_max_diff"] = logp_gap([s.logps for s in samples], old_logps, mask) \
            if old_logps is not None else max(update_gaps)
    if not comparable or it % cfg.sync_check_every == 0:
        check, width = samples[:8], mask.shape[1]
        engine_lp = pad_rows([torch.tensor(r) for r in ray.get(
            groups["engines"].actors[0].score.remote(check, cfg.temperature))], width)
        trainer_lp = pad_rows([ray.get(groups["policy"].actors[0].logps.remote(check))], width)
        out["ppo/engine_trainer_logp_max_diff"] = float(((engine_lp - trainer_lp).abs() * mask[:len(check)]).max())
    return out


def save_policy(groups: dict, out: Path | str, name: str, tokenizer_dir: str, iteration: int) -> str:
    """The policy's weights (Hugging Face format) as ``out/name``, swapped in whole: a kill mid-save keeps the
    previous copy. Cluster storage has no rename: each save there is a new ``name-<iteration>`` directory, and
    the older ones are deleted once it is complete. Returns where it went."""
    if not storage.is_uri(out):
        directory = Path(out) / name
        replace_dir(directory, lambda new: groups["policy"].call("save", str(new), tokenizer_dir),
                    complete="config.json")
        return str(directory)
    fresh = f"{name}-{iteration:06d}"
    target = storage.join(str(out), fresh)
    storage.delete(target)  # what an interrupted save of the same iteration left
    groups["policy"].call("save", target, tokenizer_dir)
    for other in storage.children(str(out)):
        if other.startswith(f"{name}-") and other != fresh:
            storage.delete(storage.join(str(out), other))
    return target


def load_prompts(cfg: PPOConfig, tokenizer, root: str | None = None, address: str | None = None):
    """(train prompts, held-out prompts, task, info): row views of the tokenized prompts in the data cache
    (runtime/data_prep.py); ``table.prompts(indices)`` gives (PromptExample, prompt token ids) pairs, so the
    feeder reads an iteration's prompts, not the whole set. ``info["files"]``: the sources' SHA-256s, for the
    resume check (hashed once, for the cache key)."""
    from unipipe_ray.data.stage_data import make_task
    from unipipe_ray.runtime.data_prep import cache_root, prepare_stage_data

    task = make_task(cfg.data) if not cfg.data.sources else None
    root = root or cache_root(cfg.data, cfg.output_dir)
    train, held_out, info = prepare_stage_data(cfg.data, "prompt", tokenizer, root, address)
    return train, held_out, task, info


def iteration_prompts(cfg: PPOConfig, prompts, it: int) -> list[tuple]:
    """Iteration ``it``'s prompts, a pure function of (train.seed, iteration): a resumed run draws what the
    first would have (``sample`` picks positions from the count alone, as it would from the list). The draw
    follows the training seed, not data.seed, so that seeds vary the run while the held-out split stays."""
    picked = random.Random(cfg.train.seed * 1_000_003 + it).sample(range(len(prompts)),
                                                                  min(cfg.prompts_per_iter, len(prompts)))
    return prompts.prompts(picked)


def run_ppo(cfg: PPOConfig, address: str | None = None, inject_engine_failure_at: int | None = None,
            inject_stop_at: int | None = None, inject_role_failures: dict | None = None,
            inject_commit_failure_at: int | None = None, storage: str | None = None) -> dict:
    """PPO on a Ray cluster (local when no address). Resumes from ``output_dir/checkpoint`` when one exists
    (``train.checkpoint_every`` iterations apart). A dead trainer, critic, reference or reward actor breaks
    its group: every group is rebuilt and the run resumes from the last checkpoint, up to
    ``train.max_failures`` times (a rollout engine is restarted by Ray alone and re-synced).

    Test hooks: ``inject_engine_failure_at`` kills a rollout actor before that iteration's generation;
    ``inject_stop_at`` raises after that many iterations, as a stopped job would end;
    ``inject_role_failures`` {iteration: (role, index)} kills that actor before that iteration, once;
    ``inject_commit_failure_at`` fails the checkpoint after that iteration once its parts are written, before
    it is committed.

    ``storage``: a URI (s3://, gs://, ...) for the checkpoints, the final and the best-gold policy, which the
    trainers upload from their own nodes (for clusters without a shared filesystem; ppo/state.py says how a
    checkpoint is committed there). ``output_dir`` keeps the driver's own files."""
    from ray.exceptions import RayActorError

    from unipipe_ray.core.models import load_tokenizer, shareable_model
    from unipipe_ray.runtime.actors import RoleDied
    from unipipe_ray.runtime.cluster import init_ray
    from unipipe_ray.runtime.data_prep import cache_root
    from unipipe_ray.runtime.launch import check_same_config, check_same_data, write_result

    started = time.time()
    out_dir = Path(cfg.output_dir).resolve()
    paths = {"policy": shareable_model(cfg.model), "reference": shareable_model(cfg.ref_model or cfg.model),
             "reward": shareable_model(cfg.reward_model) if cfg.reward_model else None}
    paths["critic"] = shareable_model(cfg.critic_model) if cfg.critic_model else (paths["reward"] or paths["policy"])
    tokenizer = load_tokenizer(cfg.model)
    train_prompts, _, task, data_info = load_prompts(cfg, tokenizer, cache_root(cfg.data, out_dir, storage), address)
    gold_scorer(cfg, task), load_rule(cfg.rule_reward)  # refuse a bad module:function before actors start
    check_same_config(out_dir / "ppo_config.json", to_dict(cfg))
    check_same_data(out_dir / "ppo_data.json", cfg.data, data_info["files"])
    recover_dir(out_dir / "best_gold")  # a kill mid-swap left the previous best at best_gold.old
    init_ray(address)
    hooks = {"engine": {inject_engine_failure_at: ("engines", 0)} if inject_engine_failure_at is not None else {},
             "roles": dict(inject_role_failures or {}), "commit": inject_commit_failure_at, "storage": storage}
    for attempt in range(cfg.train.max_failures + 1):
        try:
            result = _train(cfg, paths, tokenizer, train_prompts, task, out_dir, hooks, inject_stop_at)
            result |= {"restarts": attempt, "seconds": round(time.time() - started, 1)}
            write_result(out_dir, result)
            return result
        except (RoleDied, RayActorError) as e:
            if attempt == cfg.train.max_failures:
                raise
            log.warning("ppo: %s; rebuilding every actor group from the last checkpoint (restart %d of %d)",
                        e, attempt + 1, cfg.train.max_failures)
    raise AssertionError("unreachable")


def _train(cfg: PPOConfig, paths: dict, tokenizer, train_prompts: list, task, out_dir: Path, hooks: dict,
           inject_stop_at: int | None) -> dict:
    """One attempt: the groups from the last checkpoint (or the inputs), the iterations, the final save."""
    import ray

    from unipipe_ray.ppo import state as ppo_state
    from unipipe_ray.runtime.loop import Reporter, check_finite

    tokenizer_dir = str(paths["policy"])
    paths = dict(paths)
    out = hooks["storage"] or out_dir  # where checkpoints and policies go: cluster storage or output_dir
    checkpoints = storage.join(out, "checkpoint") if hooks["storage"] else out_dir / "checkpoint"
    resume = ppo_state.find(checkpoints)
    if resume is not None:  # the trainers and engines start from the checkpoint's weights
        paths["policy"] = ppo_state.part(resume, "policy")
        paths["critic"] = ppo_state.part(resume, "critic") or paths["critic"]
    threads = max(1, (os.cpu_count() or 1) // max(1, cfg.train.num_workers))
    groups, placement = build_groups(cfg, paths, tokenizer.pad_token_id, threads)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target is not None
              else FixedKLController(cfg.kl_coef))
    watch = HackingWatch(cfg.hacking_window, z=cfg.hacking_z)
    reporter = Reporter("ppo", cfg.iterations, str(out_dir / "tensorboard"), run=str(out_dir))
    history, start, state = [], 0, None
    # best_gold/: the policy whose own rollouts scored the best gold mean, saved before that iteration's update
    # (the update's result has not been scored yet, and on a hacked proxy it is often worse)
    best = {"gold": float("-inf"), "dir": str(out_dir / "best_gold") if not hooks["storage"] else None,
            "iteration": None}
    last_save = time.monotonic()
    try:
        if resume is not None:
            controller = ppo_state.load_controller(resume)
            groups["policy"].call("load_checkpoint", str(paths["policy"]))
            if "critic" in groups:
                groups["critic"].call("load_checkpoint", str(paths["critic"]))
            best |= {"dir": controller.get("best_dir", best["dir"]), "iteration": controller.get("best_iteration")}
            kl_ctl.load_state_dict(controller["kl"])
            watch.load_state_dict(controller["watch"])
            history, best["gold"], start = controller["history"], controller["best_gold"], controller["iteration"]
            progress(f"ppo: resuming from {resume} at iteration {start + 1} of {cfg.iterations}")
        has_gold = gold_scorer(cfg, task) is not None

        def keep_if_best(gold_mean: float, it: int) -> None:
            if has_gold and gold_mean > best["gold"]:
                best.update(gold=gold_mean, iteration=it + 1,
                            dir=save_policy(groups, out, "best_gold", tokenizer_dir, it + 1))

        devices = {name: group.call("device_name") for name, group in groups.items()}
        log.info("ppo: roles on %s", ", ".join(f"{name} {'/'.join(d)}" for name, d in devices.items()))
        specs = ray.get(join_weight_group(groups)) if cfg.weight_sync == "collective" else None
        for it in range(start, cfg.iterations):
            for kind in ("engine", "roles"):  # test hooks, each once
                if it in hooks[kind]:
                    role, index = hooks[kind].pop(it)
                    ray.kill(groups[role].actors[index], no_restart=kind == "roles")
            batch = iteration_prompts(cfg, train_prompts, it)
            metrics, state = ppo_iteration(cfg, groups, batch, task, tokenizer, kl_ctl, it, state, specs,
                                           on_scored=lambda gold_mean, it=it: keep_if_best(gold_mean, it))
            check_finite("ppo", it + 1, metrics)  # before anything is saved: the last checkpoint stays good
            metrics |= watch.update(metrics["ppo/proxy_mean"], metrics["ppo/gold_mean"], metrics["ppo/proxy_std"],
                                    metrics["ppo/gold_std"], len(batch) * cfg.samples_per_prompt)
            history.append(metrics | {"iteration": it + 1})
            reporter.line(it + 1, metrics)
            write_json_atomic(out_dir / "history.json", history)
            stop = bool(metrics["watch/hacking"]) and cfg.stop_on_hacking
            if metrics["watch/hacking"]:
                log.warning("reward hacking suspected at iteration %d: the proxy reward rises while the gold reward "
                            "falls (z %+.1f and %+.1f)%s", it + 1, metrics["watch/proxy_z"], metrics["watch/gold_z"],
                            "; stopping (stop_on_hacking)" if stop else "")
            every, minutes = cfg.train.checkpoint_every, cfg.train.checkpoint_minutes
            due = (every and (it + 1) % every == 0) or (minutes and time.monotonic() - last_save >= minutes * 60)
            if due and it + 1 < cfg.iterations and not stop:
                last_save = time.monotonic()
                fail = (RuntimeError(f"ppo: injected failure before committing checkpoint {it + 1} (test hook)")
                        if hooks["commit"] == it + 1 else None)
                ppo_state.save(checkpoints, groups, tokenizer_dir,
                               {"iteration": it + 1, "history": history, "best_gold": best["gold"],
                                "best_dir": best["dir"], "best_iteration": best["iteration"],
                                "kl": kl_ctl.state_dict(), "watch": watch.state_dict()}, fail_before_commit=fail)
            if inject_stop_at == it + 1:
                raise RuntimeError(f"ppo: injected stop after iteration {it + 1} (test hook)")
            if stop:
                break
        final = save_policy(groups, out, "final", tokenizer_dir, len(history))
        write_json_atomic(out_dir / "history.json", history)
        result = {"stage": "ppo", "config": to_dict(cfg), "metrics": history[-1], "checkpoint": final,
                  "best_gold_checkpoint": best["dir"] if best["gold"] > float("-inf") else None,
                  "best_gold_iteration": best["iteration"],  # the iteration whose rollouts that policy sampled
                  "stopped_on_hacking": bool(history[-1]["watch/hacking"]) and cfg.stop_on_hacking,
                  "resumed_at_iteration": start if resume is not None else None,
                  "train_examples": len(train_prompts), "eval_examples": 0, "devices": devices}
    finally:  # a failed or stopped run must not leave its actors holding the cluster's resources
        reporter.close()
        for group in groups.values():
            group.kill()
        ray.util.remove_placement_group(placement)
    return result
