"""Does each stage of the chain earn its place? Held-out exact match of six policies on the arith task.

Arms, per seed (the seed drives training and sampling; the held-out problems are the same for every seed):
    base              the input model
    sft               SFT of base on the task's worked solutions
    sft_ppo           GRPO from sft, rewarded by the task's checker (the gold reward)
    sft_dpo           DPO from sft on the task's constructed pairs (right answer > one arithmetic slip)
    sft_dpo_own       DPO from sft on its own samples (dpo.pairs: own, ranked by the checker)
    sft_ppo_dpo_own   DPO from sft_ppo on its own samples

Every stage runs through its CLI (`unipipe sft|ppo|dpo --config`), with the settings of
jobs/configs/quickstart.yaml's sections (the demo's), so the figures describe what a user gets. Each stage
is compared with its input on the same held-out problems: the paired difference in exact match with a 95%
paired-bootstrap interval and McNemar's p-value, per seed and pooled over seeds (the problems x seeds pairs).
Compute per arm: wall time of its stages, tokens generated (PPO rollouts, own-sample answers) and tokens
trained (from each stage's metrics).

    python experiments/chain_gains.py --seeds 0 1 2 --out results/chain_gains.md \
        --set ppo.train.lr=1e-5 --set ppo.iterations=8      # PPO settings that move the policy at all
    python experiments/chain_gains.py --seeds 0 --eval-size 8 --quick --workdir /tmp/cg --out /tmp/cg.md  # smoke

A stage whose result.json exists is not run again (delete its directory to redo it), so an interrupted
experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("base", "sft", "sft_ppo", "sft_dpo", "sft_dpo_own", "sft_ppo_dpo_own")
INPUT = {"sft": "base", "sft_ppo": "sft", "sft_dpo": "sft", "sft_dpo_own": "sft", "sft_ppo_dpo_own": "sft_ppo"}
log = logging.getLogger("chain_gains")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-size", type=int, default=96, help="held-out problems (the same for every seed)")
    p.add_argument("--workdir", default="runs/chain_gains")
    p.add_argument("--config", default=str(ROOT / "jobs/configs/quickstart.yaml"),
                   help="pipeline config whose sft / ppo / dpo sections set the stages")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage setting, e.g. ppo.train.lr=1e-5 or ppo.iterations=8 (repeatable)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test of this script)")
    p.add_argument("--out", default="results/chain_gains.md")
    p.add_argument("--merge", metavar="JSON", help="an earlier run's chain_gains.json whose seeds (those not in "
                   "--seeds) join the summary; it must have the same held-out size and settings")
    return p.parse_args(argv)


def stage_configs(args, seed: int) -> dict[str, dict]:
    """The sft / ppo / dpo sections of the pipeline config, with this experiment's model, seed and split."""
    base = yaml.safe_load(Path(args.config).read_text())
    out = {}
    for stage in ("sft", "ppo", "dpo"):
        section = copy.deepcopy(base[stage])
        data = section.setdefault("data", {})
        data["eval_size"] = args.eval_size  # split off before training: every arm is scored on these
        train = section.setdefault("train", {})
        train["seed"] = seed
        if args.quick and stage != "sft":  # SFT keeps its steps: own samples need a policy that solves some
            train["max_steps"] = 2
            if stage == "ppo":
                section["iterations"] = 2
        out[stage] = section
    for item in args.set:
        key, _, value = item.partition("=")
        stage, *path = key.split(".")
        if stage not in out or not path or not value:
            raise SystemExit(f"--set {item!r}: expected sft|ppo|dpo.KEY=VALUE")
        node = out[stage]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _value(value)
    out["ppo"].pop("reward_model", None)  # the checker is the reward: no RM arm here
    out["dpo"].pop("pairs", None)  # sft_dpo trains on the task's constructed pairs, all of them;
    out["dpo"].pop("own", None)    # the own-sample arms get their settings from own_section
    out["dpo"]["data"].pop("size", None)
    return out


def _value(text: str):
    """A --set value: a number where it reads as one (YAML takes 1e-5 for a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def run_stage(stage: str, section: dict, model: str, out_dir: Path) -> dict:
    """One stage through its CLI; its result.json (skipped when that exists already)."""
    result_file = out_dir / "result.json"
    if not result_file.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        config = out_dir / f"{stage}.yaml"
        config.write_text(yaml.safe_dump({**section, "model": model, "output_dir": str(out_dir)}, sort_keys=False))
        log.info("%s: %s from %s", out_dir.name, stage, model)
        done = subprocess.run([sys.executable, "-m", "unipipe_ray.cli", stage, "--config", str(config)], cwd=ROOT,
                              env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
        if done.returncode != 0:
            raise SystemExit(f"{stage} in {out_dir} failed (exit {done.returncode})")
    return json.loads(result_file.read_text())


def own_section(section: dict, args) -> dict:
    """DPO on the policy's own samples, as the demo runs it."""
    return {**section, "pairs": "own", "data": {**section["data"], "size": 16 if args.quick else 48},
            "own": {"samples": 4, "max_new_tokens": 64, "temperature": 1.0}}


def tokens_of(stage: str, result: dict, out_dir: Path) -> dict:
    """(generated, trained) tokens of one stage run, from what it wrote."""
    metrics = result.get("metrics", {})
    generated = 0
    if stage == "ppo":
        history = json.loads((out_dir / "history.json").read_text())
        cfg = result["config"]
        generated = sum(h["ppo/response_length"] * cfg["prompts_per_iter"] * cfg["samples_per_prompt"]
                        for h in history)
    own = out_dir / "own_pairs.json"
    if own.exists():
        stats = json.loads(own.read_text()).get("stats", {})
        generated += stats.get("train_tokens_generated", 0) + stats.get("eval_tokens_generated", 0)
    if stage == "ppo":  # the loss runs over the sampled responses, once per PPO epoch
        trained = generated * result["config"]["ppo_epochs"]
    else:  # SFT / DPO: the non-padding tokens of every training batch (runtime/loop.Reporter)
        trained = metrics.get(f"{stage}/tokens_total", 0.0)
    return {"generated": float(generated), "trained": float(trained)}


def run_seed(args, seed: int) -> dict:
    """Every arm's checkpoint and compute for one seed."""
    from unipipe_ray.core.models import resolve_model

    work = Path(args.workdir).resolve() / f"seed{seed}"
    sections = stage_configs(args, seed)
    runs = {}
    runs["sft"] = ("sft", run_stage("sft", sections["sft"], args.model, work / "sft"), work / "sft")
    sft = runs["sft"][1]["checkpoint"]
    runs["sft_ppo"] = ("ppo", run_stage("ppo", sections["ppo"], sft, work / "sft_ppo"), work / "sft_ppo")
    ppo = runs["sft_ppo"][1]["checkpoint"]
    runs["sft_dpo"] = ("dpo", run_stage("dpo", sections["dpo"], sft, work / "sft_dpo"), work / "sft_dpo")
    own = own_section(sections["dpo"], args)
    runs["sft_dpo_own"] = ("dpo", run_stage("dpo", own, sft, work / "sft_dpo_own"), work / "sft_dpo_own")
    runs["sft_ppo_dpo_own"] = ("dpo", run_stage("dpo", own, ppo, work / "sft_ppo_dpo_own"),
                               work / "sft_ppo_dpo_own")
    checkpoints = {"base": str(resolve_model(args.model))} | {arm: r[1]["checkpoint"] for arm, r in runs.items()}
    compute = {"base": {"seconds": 0.0, "generated": 0.0, "trained": 0.0}}
    for arm in ARMS[1:]:  # an arm's compute includes its inputs' (sft_ppo_dpo_own = sft + ppo + own dpo)
        stage, result, out_dir = runs[arm]
        own_cost = {"seconds": float(result.get("seconds") or 0.0), **tokens_of(stage, result, out_dir)}
        compute[arm] = {k: compute[INPUT[arm]][k] + own_cost[k] for k in own_cost}
    return {"checkpoints": checkpoints, "compute": compute, "sections": sections}


def held_out(args, sections: dict):
    """The held-out problems: the sft section's split (the same data config for every arm)."""
    from unipipe_ray.config import DataConfig
    from unipipe_ray.data.held_out import held_out as split

    data = DataConfig(**{k: v for k, v in sections["sft"]["data"].items()})
    return split(data, args.eval_size)


def evaluate(args, seed: int, checkpoints: dict, sections: dict, cache: Path) -> dict[str, list[float]]:
    """Per-problem exact match (0/1) of every arm on the held-out problems, cached per seed."""
    from unipipe_ray.eval.evaluate import evaluate_model

    if cache.exists():
        return json.loads(cache.read_text())
    task, examples, _ = held_out(args, sections)
    scores = {}
    for arm in ARMS:
        t = time.perf_counter()
        result = evaluate_model(checkpoints[arm], task, examples, max_new_tokens=96, progress=False)
        scores[arm] = result["exact_match"]["scores"]
        log.info("seed %d %s: exact match %.3f (%.0f s)", seed, arm, float(np.mean(scores[arm])),
                 time.perf_counter() - t)
    cache.write_text(json.dumps(scores))
    return scores


def summarise(scores_by_seed: dict[int, dict], compute_by_seed: dict[int, dict]) -> dict:
    from unipipe_ray.eval.summary import compare_scores, entry

    seeds = sorted(scores_by_seed)
    pooled = {arm: [x for s in seeds for x in scores_by_seed[s][arm]] for arm in ARMS}
    arms = {arm: {k: v for k, v in entry(pooled[arm], binary=True).items() if k != "scores"}
                 | {"per_seed": [float(np.mean(scores_by_seed[s][arm])) for s in seeds],
                    **{f"{k}_mean": float(np.mean([compute_by_seed[s][arm][k] for s in seeds]))
                       for k in ("seconds", "generated", "trained")}}
            for arm in ARMS}
    stages = {}
    for arm, before in INPUT.items():
        pooled_cmp = compare_scores(pooled[before], pooled[arm], binary=True)
        per_seed = [compare_scores(scores_by_seed[s][before], scores_by_seed[s][arm], binary=True) for s in seeds]
        stages[arm] = {"input": before, **pooled_cmp, "per_seed": per_seed}
    return {"seeds": seeds, "arms": arms, "stages": stages}


def markdown(args, summary: dict, n: int, wall: float) -> str:
    import torch

    from unipipe_ray.runtime.devices import cpu_model

    cpu = cpu_model()
    lines = [f"# Chain gains: {args.model} on arith, {len(summary['seeds'])} seed(s) x {n} held-out problems", "",
             f"Measured {datetime.date.today()} on {cpu} ({os.cpu_count()} cores, "
             f"{'GPU' if torch.cuda.is_available() else 'no GPU'}); {wall / 60:.0f} min in all"
             f"{f' (seeds {args.seeds}; the others from {args.merge}, run earlier)' if args.merge else ''}. "
             f"Command: `python experiments/chain_gains.py {' '.join(sys.argv[1:])}`. Stage settings: the sections "
             f"of `{Path(args.config).name}` (the demo's), PPO rewarded by the task's checker alone.", "",
             "## Each arm (exact match pooled over seeds, 95% bootstrap interval)", "",
             "| arm | exact match | per seed | wall s (mean, with its inputs) | tokens generated | tokens trained |",
             "|---|---|---|---|---|---|"]
    for arm, e in summary["arms"].items():
        lines.append(f"| {arm} | {e['estimate']:.3f} [{e['low']:.3f}, {e['high']:.3f}] | "
                     f"{', '.join(f'{x:.3f}' for x in e['per_seed'])} | {e['seconds_mean']:.0f} | "
                     f"{e['generated_mean']:.0f} | {e['trained_mean']:.0f} |")
    lines += ["", "## Each stage against its input (paired on the same problems)", "",
              "| stage | input | difference [95% interval], pooled | McNemar p, pooled | per seed (diff, p) "
              "| verdict |",
              "|---|---|---|---|---|---|"]
    for arm, c in summary["stages"].items():
        verdict = ("helped" if c["diff"] > 0 else "hurt") if c["significant"] else "no significant change"
        per = "; ".join(f"{x['diff']:+.3f}, p={x['p_value']:.2g}" for x in c["per_seed"])
        lines.append(f"| {arm} | {c['input']} | {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | "
                     f"{c['p_value']:.3g} | {per} | {verdict} |")
    lines += ["", "Target (issue 20): PPO and the own-sample DPO each raise exact match over their input with the "
              "interval of the paired difference excluding 0. The table says which did; nothing is tuned to it.",
              ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.time()
    scores, compute, n = {}, {}, 0
    for seed in args.seeds:
        done = run_seed(args, seed)
        cache = Path(args.workdir).resolve() / f"seed{seed}" / "scores.json"
        scores[seed] = evaluate(args, seed, done["checkpoints"], done["sections"], cache)
        compute[seed] = done["compute"]
        n = len(scores[seed]["base"])
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        for key, seed_scores in earlier["scores"].items():
            if int(key) in scores:
                continue
            if n and len(seed_scores["base"]) != n:
                raise SystemExit(f"--merge {args.merge}: seed {key} has {len(seed_scores['base'])} held-out "
                                 f"problems, this run {n}")
            scores[int(key)], compute[int(key)] = seed_scores, earlier["compute"][key]
            n = len(seed_scores["base"])
    summary = summarise(scores, compute)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(args, summary, n, time.time() - started))
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "scores": scores, "compute": compute},
                                                   indent=1, default=float))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
