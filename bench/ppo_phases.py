"""Where one PPO iteration's time goes: generate / score / prepare / train / sync, from a run's history.json.

    unipipe run --config jobs/configs/quickstart.yaml        # or any unipipe ppo run
    python bench/ppo_phases.py --history runs/quickstart/ppo/history.json --out results/ppo_phases_cpu.md

The PPO controller times each phase of every iteration (ppo/controller.py: ppo_iteration) and writes them to
history.json as time/<phase>_s; this script tabulates them with the run's settings and the machine.

Before / after a change, from bench/grpo_vs_trl.py's per-side files (same settings, the code differs):

    python bench/ppo_phases.py --compare "before (commit abc)=/tmp/before/ours-hf.json" \
        --compare "after=/tmp/after/ours-hf.json" --warmup 1 --out results/ppo_phases_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

PHASES = ("generate", "score", "prepare", "train", "sync")


def compare(args) -> str:
    """Mean seconds per phase for each labelled grpo_vs_trl side file, the first --warmup iterations left out."""
    sides = {}
    for item in args.compare:
        label, _, path = item.rpartition("=")
        data = json.loads(Path(path).read_text())
        timed = data["iterations"][args.warmup:] or data["iterations"]
        sides[label] = {"command": data.get("command", ""), "timed": len(timed),
                        "phases": {ph: statistics.mean(r["phases"].get(ph, 0.0) for r in timed) for ph in PHASES},
                        "total": statistics.mean(r["seconds"] for r in timed),
                        "per_iteration": [round(r["seconds"], 1) for r in data["iterations"]]}
    from unipipe_ray.runtime.devices import cpu_model

    cpu = cpu_model()
    labels = list(sides)
    lines = ["# PPO iteration phases, before and after", "",
             f"Measured {datetime.date.today()} on {cpu} ({os.cpu_count()} cores), no GPU, with "
             f"`bench/grpo_vs_trl.py` (one side per process, one after another; the first {args.warmup} "
             "iteration(s) of each left out of the means).", "",
             "| phase | " + " | ".join(f"{lb}: s (share)" for lb in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for ph in PHASES:
        cells = [(sides[lb]["phases"][ph], sides[lb]["total"]) for lb in labels]
        lines.append(f"| {ph} | " + " | ".join(f"{v:.1f} ({v / total:.0%})" for v, total in cells) + " |")
    lines.append("| iteration | " + " | ".join(f"{sides[lb]['total']:.1f}" for lb in labels) + " |")
    lines += ["", *(f"- {lb}: {sides[lb]['timed']} timed iterations; every iteration (s): "
                    f"{sides[lb]['per_iteration']}; command: `{sides[lb]['command']}`" for lb in labels)]
    lines += [f"- {n}" for n in args.note]
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(sides, indent=1))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--history", help="<ppo output_dir>/history.json")
    p.add_argument("--compare", action="append", default=[], help="LABEL=grpo_vs_trl side .json (repeatable)")
    p.add_argument("--warmup", type=int, default=1, help="--compare: first iterations left out")
    p.add_argument("--out", help="markdown file (a .json with the per-iteration numbers goes beside it)")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)
    if args.compare:
        text = compare(args)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    if not args.history:
        p.error("give --history or --compare")
    history = json.loads(Path(args.history).read_text())
    config = json.loads((Path(args.history).parent / "ppo_config.json").read_text())
    from unipipe_ray.runtime.devices import cpu_model

    cpu = cpu_model()
    rows = [{ph: h.get(f"time/{ph}_s", 0.0) for ph in PHASES} | {"iteration": h["iteration"],
            "tokens_per_s": h["ppo/rollout_tokens_per_s"], "response_length": h["ppo/response_length"]}
            for h in history]
    total = {ph: statistics.mean(r[ph] for r in rows) for ph in PHASES}
    whole = sum(total.values())
    lines = [f"# PPO iteration phases: {config['model']}, {config['engine']} engine, {config['estimator']}", "",
             f"Measured {datetime.date.today()} on {cpu} ({os.cpu_count()} cores), no GPU; from `{args.history}`. "
             f"{config['prompts_per_iter']} prompts x {config['samples_per_prompt']} samples, <= "
             f"{config['max_new_tokens']} new tokens, {config['ppo_epochs']} PPO epoch(s), minibatch "
             f"{config['minibatch_size']}, {config['train']['num_workers']} policy worker(s), dtype "
             f"{config['train']['dtype']}, reward model: {'yes' if config['reward_model'] else 'no'}.", "",
             "| phase | mean s per iteration | share |", "|---|---|---|"]
    lines += [f"| {ph} | {total[ph]:.1f} | {total[ph] / whole:.0%} |" for ph in PHASES]
    lines += [f"| total | {whole:.1f} | |", "",
              "Per iteration (s): " + "; ".join(f"{r['iteration']}: " + " / ".join(f"{r[ph]:.1f}" for ph in PHASES)
                                               for r in rows) + " (generate / score / prepare / train / sync).",
              f"Rollout throughput {statistics.mean(r['tokens_per_s'] for r in rows):.0f} tokens/s on average; "
              f"mean response length {statistics.mean(r['response_length'] for r in rows):.1f} tokens.", ""]
    lines += [f"- {n}" for n in args.note]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"config": config, "iterations": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
