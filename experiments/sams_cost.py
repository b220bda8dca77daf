"""What SamS costs: DPO step time and peak memory, plain DPO vs DPO + SamS (keep 50%) at the same batch.

    nice -n 19 python experiments/sams_cost.py                # tiny model + SmolLM2-135M (~10 min on 2 cores)
    nice -n 19 python experiments/sams_cost.py --models tiny  # seconds

Issue 6's targets: SamS step time <= 1.1x plain DPO; peak memory below plain DPO at the same batch. Each arm runs
in a fresh process (so one arm's allocations cannot set another's high-water mark) on the same pairs in the
same order: `steps` timed steps after one warm-up step. The step is the DPO stage's own (experiments/
sams_common.py): the reference scored live, the LM head chunked (train.logps_chunk_size, the stage default
1024). Memory: the step's peak resident set above the resident set before the first step (VmHWM after
resetting it), and the process's resident set before the steps (models, optimizer, SamS nets incl. MiniLM).
Writes results/sams_cost.json and results/sams_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (model spec, data task, pairs per batch, max tokens per sequence, timed steps, rounds)
SETTINGS = {"tiny": ("tiny", "arith", 16, 128, 4, 2), "smollm2": ("smollm2-135m", "hh_harmless", 8, 128, 2, 1)}
ARMS = ("none", "random", "sams")


def worker(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "experiments"))
    from sams_common import HH_PATH, DpoLearner, dpo_config, load_model, peak_kb, reset_peak
    from transformers import AutoTokenizer

    from unipipe_ray.config import DataConfig
    from unipipe_ray.core.models import resolve_model
    from unipipe_ray.data.stage_data import load_stage_data

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec, task, batch, max_length = SETTINGS[args.model][:4]
    path = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = DataConfig(task=task, task_path=str(HH_PATH) if task == "hh_harmless" else None, task_size=400,
                      eval_size=0 if task == "arith" else 8, max_length=max_length,
                      on_bad_record="skip")
    feats = load_stage_data(data, "preference", tokenizer)[0]
    cfg = dpo_config(args.arm, 0.5, 0.1, 1024)
    learner = DpoLearner(load_model(path), load_model(path), cfg, tokenizer.pad_token_id, lr=1e-6, seed=0)
    times, rss = [], None
    for step in range(args.steps + 1):
        idx = list(range(step * batch, (step + 1) * batch))
        if step == 1:  # after the warm-up step: Adam's state exists, first-call costs are paid
            rss = reset_peak()
        out = learner.step([feats[i] for i in idx], [("train", i) for i in idx])
        if step:
            times.append(out["time_s"])
    return {"model": args.model, "arm": args.arm, "pairs": batch, "kept": out["kept"], "max_length": max_length,
            "step_s": times, "step_s_median": statistics.median(times), "rss_before_steps_mb": rss / 1024,
            "step_peak_above_rss_mb": (peak_kb() - rss) / 1024, "threads": args.threads}


def run_arm(model: str, arm: str, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--arm", arm, "--steps", str(steps),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{model}/{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def steps_rounds(model, args) -> str:
    steps, rounds = args.steps or SETTINGS[model][4], args.repeats or SETTINGS[model][5]
    return f"{steps} timed steps x {rounds} rounds"


def report(rows: list[dict], args) -> str:
    from unipipe_ray.runtime.devices import cpu_model

    lines = ["# SamS cost: step time and peak memory vs plain DPO (CPU)", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, no GPU; torch threads "
             f"{args.threads}; run under `nice -n 19` while another job used the CPU, so times carry noise.",
             f"Command: `nice -n 19 python experiments/sams_cost.py {' '.join(sys.argv[1:])}`. Each arm: a fresh "
             f"process, 1 warm-up + the timed steps on the same pairs; arms interleaved over rounds; medians over "
             f"all timed steps (tiny: {steps_rounds('tiny', args)}, smollm2: {steps_rounds('smollm2', args)}).",
             "SamS: default settings (frozen all-MiniLM-L6-v2 encoder, f_S and f_S' 4 x 256, 4 Adam steps per net "
             "per round, 32 replayed batches), keep 50%. Random: keep 50% at random (no scheduler).", "",
             "Peak: the process's resident-set high-water mark during the timed steps (VmHWM reset after the "
             "warm-up step): models, optimizer state, SamS nets and whatever the warm-up step left resident, plus "
             "the steps' own peak. Above RSS: that peak minus the resident set before the timed steps (a SamS "
             "process keeps more of its warm-up allocations resident, so this column flatters it; use the peak).",
             "", "| model | pairs/batch | arm | kept | step s (median) | x plain | peak MB | x plain | "
             "RSS before steps MB | peak above it MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        arms = {arm: [r for r in rows if r["model"] == model and r["arm"] == arm] for arm in ARMS}
        if not all(arms.values()):
            continue
        summary = {arm: (statistics.median(t for r in rs for t in r["step_s"]),
                         statistics.median(r["step_peak_above_rss_mb"] + r["rss_before_steps_mb"] for r in rs),
                         statistics.median(r["rss_before_steps_mb"] for r in rs),
                         statistics.median(r["step_peak_above_rss_mb"] for r in rs)) for arm, rs in arms.items()}
        for arm, (step, peak, rss, above) in summary.items():
            r = arms[arm][0]
            lines.append(f"| {model} | {r['pairs']} x <= {r['max_length']} tok | {arm} | {r['kept']} | {step:.3f} | "
                         f"{step / summary['none'][0]:.2f} | {peak:.0f} | {peak / summary['none'][1]:.2f} | "
                         f"{rss:.0f} | {above:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from unipipe_ray.runtime.devices import cpu_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=sorted(SETTINGS))
    p.add_argument("--steps", type=int, default=0, help="timed steps per arm (0: the model's default)")
    p.add_argument("--repeats", type=int, default=0, help="rounds over the arms (0: the model's default)")
    # one thread: on 2 busy cores two OpenMP threads wait on each other (measured: ~10x slower steps)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results/sams_cost"))
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.report_only:
        saved = json.loads(Path(args.out + ".json").read_text())
        sys.argv[1:] = saved["argv"]
        Path(args.out + ".md").write_text(report(saved["rows"], args))
        return
    rows = []
    for model in args.models:
        for _ in range(args.repeats or SETTINGS[model][5]):
            for arm in ARMS:
                rows.append(run_arm(model, arm, args.steps or SETTINGS[model][4], args.threads))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_s"}), flush=True)
    Path(args.out + ".json").write_text(json.dumps({"argv": sys.argv[1:], "cpu": cpu_model(), "rows": rows},
                                                   indent=1))
    Path(args.out + ".md").write_text(report(rows, args))
    print(report(rows, args))


if __name__ == "__main__":
    main()
