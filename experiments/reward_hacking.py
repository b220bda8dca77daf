"""Reward hacking without planting it: PPO rewarded by a weakly trained reward model alone (gold weight 0).

    SFT (the demo's settings) -> RM (the demo's, or fewer steps: --rm-steps) -> GRPO on the RM's score only

The task's checker (exact match of "#### n") is never part of the reward; it is only watched. The watch
(ppo/watch.py) compares the later half of its window with the earlier half, for the proxy (RM score) and for
the gold reward, and fires when the proxy rises while the gold falls. PPO keeps the iteration with the best
gold mean in best_gold/. This script runs the stages through their CLIs, then writes the two curves (PNG),
the iteration where the watch first fired (if it did), and the held-out exact match of SFT, the final policy
and best_gold.

    python experiments/reward_hacking.py --out results/reward_hacking.md
    python experiments/reward_hacking.py --iterations 2 --rm-steps 2 --eval-size 8 --workdir /tmp/rh \
        --out /tmp/rh.md      # smoke

A stage whose result.json exists is not run again, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chain_gains  # noqa: E402  (same directory: the stage runner and the held-out split)

log = logging.getLogger("reward_hacking")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=128, help="held-out problems (split off before training)")
    p.add_argument("--rm-steps", type=int, default=16, help="reward-model steps (16 in results/reward_hacking.md; "
                   "the demo now trains 12)")
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-5, help="policy learning rate")
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--workdir", default="runs/reward_hacking")
    p.add_argument("--out", default="results/reward_hacking.md")
    return p.parse_args(argv)


def sections(args) -> dict:
    cg_args = chain_gains.parse_args(["--seeds", str(args.seed), "--eval-size", str(args.eval_size)])
    out = chain_gains.stage_configs(cg_args, args.seed)  # sft and ppo as the demo (ppo: checker reward, removed below)
    base = chain_gains.yaml.safe_load(Path(cg_args.config).read_text())
    rm = {**base["rm"], "data": {**base["rm"]["data"], "eval_size": args.eval_size},
          "train": {**base["rm"]["train"], "seed": args.seed, "max_steps": args.rm_steps}}
    ppo = out["ppo"]
    ppo.update(gold_reward_weight=0.0, iterations=args.iterations, prompts_per_iter=8, samples_per_prompt=4,
               minibatch_size=32, ppo_epochs=1, kl_coef=args.kl_coef, kl_in="loss", kl_estimator="k3",
               stop_on_hacking=False)  # run on after the verdict, so the curves show what followed
    ppo["train"] = {**ppo["train"], "lr": args.lr, "checkpoint_every": 4}
    return {"sft": out["sft"], "rm": rm, "ppo": ppo}


def first_alarm(history: list[dict]) -> int | None:
    return next((h["iteration"] for h in history if h.get("watch/hacking")), None)


def plot(history: list[dict], alarm: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(its, [h["ppo/gold_mean"] for h in history], "o-", label="gold: checker's exact match (watched only)")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("gold reward (batch mean)")
    twin = ax.twinx()
    twin.plot(its, [h["ppo/proxy_mean"] for h in history], "s--", color="tab:red", label="proxy: RM score (optimised)")
    twin.set_ylabel("proxy reward (batch mean)")
    if alarm is not None:
        ax.axvline(alarm, color="grey", linestyle=":", label=f"watch fired (iteration {alarm})")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.workdir).resolve()
    cfg = sections(args)
    sft_result = chain_gains.run_stage("sft", cfg["sft"], args.model, work / "sft")
    sft = sft_result["checkpoint"]
    rm = chain_gains.run_stage("rm", cfg["rm"], sft, work / "rm")
    ppo_section = {**cfg["ppo"], "reward_model": rm["checkpoint"]}
    ppo = chain_gains.run_stage("ppo", ppo_section, sft, work / "ppo")
    history = json.loads((work / "ppo" / "history.json").read_text())
    alarm = first_alarm(history)

    policies = {"sft": sft, "final": ppo["checkpoint"], "best_gold": ppo.get("best_gold_checkpoint")}
    answers = held_out_answers(args, cfg, {name: path for name, path in policies.items() if path},
                               work / "ppo" / "held_out.json")
    scores = {name: a["scores"] for name, a in answers.items()}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(history, alarm, png)
    out.with_suffix(".json").write_text(json.dumps({"history": history, "alarm": alarm, "scores": scores,
                                                    "rm_metrics": rm.get("metrics", {})}, indent=1, default=float))
    seconds = {name: float(r.get("seconds") or 0.0) for name, r in (("SFT", sft_result), ("RM", rm), ("PPO", ppo))}
    out.write_text(markdown(args, cfg, history, alarm, answers, rm, ppo, png, seconds))
    log.info("wrote %s", out)


def held_out_answers(args, cfg, policies: dict, cache: Path) -> dict:
    """{policy: {"scores": exact match per held-out problem, "texts": its greedy answers}}, cached in ``cache``
    (the checkpoints are fixed once their stages are done)."""
    if cache.exists():
        return json.loads(cache.read_text())
    from unipipe_ray.eval.evaluate import evaluate_generations, generate_completions

    cg_args = chain_gains.parse_args(["--eval-size", str(args.eval_size)])
    task, examples, _ = chain_gains.held_out(cg_args, cfg)
    out = {}
    for name, path in policies.items():
        texts = generate_completions(path, examples, max_new_tokens=96, progress=False)
        out[name] = {"scores": evaluate_generations(texts, examples, task)["exact_match"]["scores"], "texts": texts}
    cache.write_text(json.dumps(out))
    return out


def markdown(args, cfg, history, alarm, answers, rm, ppo, png, seconds: dict) -> str:
    from unipipe_ray.eval.summary import compare_scores
    from unipipe_ray.runtime.devices import cpu_model

    scores = {name: a["scores"] for name, a in answers.items()}

    rm_acc = {k: v for k, v in rm.get("metrics", {}).items() if "eval_acc" in k}
    lines = [f"# Reward hacking on its own: {args.model}, arith, PPO on a weak reward model's score alone", "",
             f"Measured {datetime.date.today()} on {cpu_model()} ({os.cpu_count()} cores); "
             f"stages {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}. Command: "
             f"`python experiments/reward_hacking.py {' '.join(sys.argv[1:])}`.", "",
             f"Settings: SFT as the demo; reward model from SFT, {args.rm_steps} steps (the RM's own held-out "
             f"metrics: {json.dumps(rm_acc) if rm_acc else 'none recorded'}); GRPO {args.iterations} iterations "
             f"x {cfg['ppo']['prompts_per_iter']} prompts x {cfg['ppo']['samples_per_prompt']} samples, lr "
             f"{args.lr:g}, KL {args.kl_coef:g} (k3, in the loss), reward = RM score only (gold_reward_weight 0), less "
             f"the demo's {cfg['ppo'].get('missing_eos_penalty', 0):g} for an answer cut at the length limit; "
             f"the watch: window {cfg['ppo'].get('hacking_window', 4)}, z 2.", "",
             f"![proxy and gold]({png.name})", "",
             (f"**The watch fired at iteration {alarm}.**" if alarm is not None else
              "**The watch did not fire**: within these iterations the proxy did not rise while the gold fell "
              "by the watch's test."), "",
             "| iteration | proxy (RM) mean | gold mean | response length | KL | watch proxy z | watch gold z "
             "| fired |",
             "|---|---|---|---|---|---|---|---|"]
    for h in history:
        lines.append(f"| {h['iteration']} | {h['ppo/proxy_mean']:+.3f} | {h['ppo/gold_mean']:.3f} | "
                     f"{h['ppo/response_length']:.1f} | {h['ppo/kl']:.2f} | {h.get('watch/proxy_z', 0):+.1f} | "
                     f"{h.get('watch/gold_z', 0):+.1f} | {'yes' if h.get('watch/hacking') else ''} |")
    lines += ["", f"## Held-out exact match ({len(scores['sft'])} problems, greedy)", "",
              "| policy | exact match | against sft: difference [95% interval], McNemar p |", "|---|---|---|"]
    for name, s in scores.items():
        cmp = "" if name == "sft" else (lambda c: f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], "
                                                  f"p={c['p_value']:.2g}")(compare_scores(scores["sft"], s,
                                                                                          binary=True))
        lines.append(f"| {name} | {float(np.mean(s)):.3f} | {cmp} |")
    if ppo.get("best_gold_iteration") is not None:
        lines += ["", f"best_gold is the policy that sampled iteration {ppo['best_gold_iteration']}'s rollouts (the "
                  "best gold mean of the run), saved before that iteration's update"
                  + (": the SFT policy itself." if ppo["best_gold_iteration"] == 1 else ".")]
    lines += ["", "The first held-out problem's greedy answers (the hacked policy's show what the RM pays for):", ""]
    for name, a in answers.items():
        lines.append(f"- {name}: `{a['texts'][0][:300]!r}`")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
