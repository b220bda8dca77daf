"""Reproduction of "Balancing the Budget" (Raghavendra, Kang, Ritter, ACL 2025; docs/allocation.md): how to split N
annotated examples between SFT demonstrations (N*r) and preference pairs (N*(1-r)), SFT first, then DPO.

    nice -n 19 python experiments/allocation_base.py        # once: the CPU base model (prose, no answer format)
    nice -n 19 python experiments/allocation_repro.py       # the sweep (tune_configs/allocation_cpu.yaml) + report
    python experiments/allocation_repro.py --report-only    # rewrite results/allocation_repro.{md,json}
    nice -n 19 python experiments/allocation_repro.py --seeds 2 --name allocation_cpu_s2 --merge allocation_cpu
                                                            # one more seed later, pooled with the first sweep

    # GPU machine (one GPU per trial stage, the paper's lrs 5e-5 / 5e-6), same task, grid and report:
    python experiments/allocation_repro.py --model smollm2-135m --gpu [--budgets 100 250 500 1000] \\
        [--set base.sft.data.task_size=5000 ...]

The sweep is `unipipe_ray.tune.run.run_tune` on the YAML: every trial takes budget_split of the arith pool
(round(N*r) step-format SFT examples, the rest (correct, one-slip) pairs of other questions), runs SFT then
DPO (reference = the SFT model, the base model at r = 0) and reports held-out greedy accuracy by the "#### n"
checker and the share of answers without "#### n" (format_miss). Re-running continues the sweep: finished trials
are kept, unfinished and errored ones run (Tune's restore). The experiment directory is
runs/tune/<name>/ (name: allocation_cpu, or allocation_gpu_<model> with --gpu) with Tune's sweep_report.md;
this script adds results/allocation_repro.md (+ .json of the per-trial results), one paragraph per finding:
  (i) at the smallest budget r = 1 is best or tied; (ii) at the largest some r < 1 beats r = 1, and the best r
  falls as N grows; (iii) r = 0 is worse than r = 0.1 at mid/large N and its answers miss the format; (iv) a
  smaller budget with the right split matches a larger budget with a worse one.
Intervals: 95% t over seeds (few seeds: wide) and, for a cell, a Wilson interval over all its graded answers
(held-out questions x seeds; this one ignores seed-to-seed variation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tune_configs/allocation_cpu.yaml"
# A pretrained 135M model: the paper's learning rates; one GPU per stage worker, as many trials as GPUs.
GPU_OVERRIDES = ["base.sft.train.use_gpu=true", "base.dpo.train.use_gpu=true", "base.sft.train.lr=5.0e-5",
                 "base.dpo.train.lr=5.0e-6", "max_concurrent_trials=null"]
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def default_base() -> str:
    from unipipe_ray.core.models import cache_dir

    return str(cache_dir() / "allocation_base")


def sweep_overrides(args) -> list[str]:
    """The YAML's settings this run changes: the model, the name, GPU training, grid edits, --set."""
    model = args.model or default_base()
    if not args.gpu and not (Path(model).expanduser() / "config.json").exists() and model == default_base():
        sys.exit(f"no base model at {model}: run `nice -n 19 python experiments/allocation_base.py` first")
    name = args.name or ("allocation_cpu" if not args.gpu else "allocation_gpu_" + re.sub(r"\W", "-", Path(model).name))
    out = [f"base.model={model}", f"name={name}", f"storage_path={ROOT / 'runs/tune'}"]
    out += GPU_OVERRIDES if args.gpu else []
    for key, values in (("budget", args.budgets), ("sft_ratio", args.ratios), ("seed", args.seeds)):
        if values:
            out.append(f"space.{key}.grid={json.dumps(values)}")
    return out + list(args.set)


def run_sweep(args) -> Path:
    from unipipe_ray.config import load_config_with_keys
    from unipipe_ray.tune.cli import base_keys
    from unipipe_ray.tune.config import TuneConfig
    from unipipe_ray.tune.run import experiment_dir, run_tune

    overrides = sweep_overrides(args)
    cfg, given = load_config_with_keys(TuneConfig, args.config, overrides)
    if args.report_only:
        return experiment_dir(cfg)
    return run_tune(cfg, base_keys(given), args.address)


# ---------------------------------------------------------------- analysis


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return math.nan, math.nan
    z, p = 1.959964, correct / n
    scale = 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / scale, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return mid - half, mid + half


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, 95% t half-width) over seeds; NaN half-width for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    return mean, (T975[df - 1] if df <= len(T975) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def trial_rows(exp_dir: Path) -> list[dict]:
    """Finished trials with the final (post-DPO or post-SFT) metrics, one row each."""
    from unipipe_ray.tune.trials import finished, load_trials

    keep = ("accuracy", "accuracy_low", "accuracy_high", "format_miss", "format_miss_count", "n_eval",
            "pref_accuracy", "stage", "sft_examples", "pref_pairs", "seconds")
    rows = []
    for r in finished(load_trials(exp_dir), "accuracy"):
        p, m = r["params"], r["metrics"]
        after_sft = next((h for h in r["history"] if h.get("stage") == "sft"), {})
        rows.append({"budget": p["budget"], "r": float(p["sft_ratio"]), "seed": p["seed"],
                     **{k: m.get(k) for k in keep}, "accuracy_after_sft": after_sft.get("accuracy"),
                     "start": m.get("timestamp", 0) - m.get("time_total_s", 0), "end": m.get("timestamp"),
                     "format_miss_after_sft": after_sft.get("format_miss")})
    return sorted(rows, key=lambda x: (x["budget"], -x["r"], x["seed"]))


def cells_of(rows: list[dict]) -> dict[tuple, dict]:
    """{(budget, r): accuracy mean/t-half-width over seeds, pooled Wilson interval, format misses, per-seed}."""
    groups: dict[tuple, list] = {}
    for x in rows:
        groups.setdefault((x["budget"], x["r"]), []).append(x)
    out = {}
    for key, xs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        correct, n = sum(round(x["accuracy"] * x["n_eval"]) for x in xs), sum(x["n_eval"] for x in xs)
        mean, half = t_interval([x["accuracy"] for x in xs])
        out[key] = {"mean": mean, "half": half, "wilson": wilson(correct, n), "correct": correct, "n": n,
                    "misses": sum(x["format_miss_count"] or 0 for x in xs), "seeds": {x["seed"]: x for x in xs},
                    "pref_accuracy": statistics.fmean(x["pref_accuracy"] for x in xs) if all(
                        x["pref_accuracy"] is not None for x in xs) else None}
    return out


def paired(cells: dict, budget: int, ra: float, rb: float) -> tuple[float, float, int] | None:
    """Accuracy of r=ra minus r=rb at one budget over the seeds both have: (mean, t half-width, seeds)."""
    if (budget, ra) not in cells or (budget, rb) not in cells:
        return None
    a, b = cells[(budget, ra)]["seeds"], cells[(budget, rb)]["seeds"]
    diffs = [a[s]["accuracy"] - b[s]["accuracy"] for s in sorted(set(a) & set(b))]
    return (*t_interval(diffs), len(diffs)) if diffs else None


def _cell(c: dict) -> str:
    half = "" if math.isnan(c["half"]) else f" ± {c['half']:.3f}"
    return f"{c['mean']:.3f}{half} [{c['wilson'][0]:.2f}, {c['wilson'][1]:.2f}]"


def _diff(d) -> str:
    if d is None:
        return "n/a"
    mean, half, n = d
    return f"{mean:+.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}") + f" ({n} seed{'s' * (n != 1)})"


def _overlap(a: dict, b: dict) -> bool:
    return a["wilson"][0] <= b["wilson"][1] and b["wilson"][0] <= a["wilson"][1]


def _best(cells: dict, budget: int) -> float:
    return max((r for b, r in cells if b == budget), key=lambda r: cells[(budget, r)]["mean"])


def finding_i(cells: dict, budgets: list[int]) -> str:
    n0 = budgets[0]
    if (n0, 1.0) not in cells:
        return "(i) not testable: no r = 1 trial at the smallest budget."
    best, c1 = _best(cells, n0), cells[(n0, 1.0)]
    if best == 1.0:
        others = [r for b, r in cells if b == n0 and r != 1.0]
        if not others:
            return f"(i) At N = {n0}, r = 1 reaches {_cell(c1)}; no other split to compare."
        second = max(others, key=lambda r: cells[(n0, r)]["mean"])
        c2, d = cells[(n0, second)], paired(cells, n0, 1.0, second)
        return (f"(i) At N = {n0}, r = 1 is best: {_cell(c1)}; the runner-up r = {second:g} reaches {_cell(c2)}, "
                f"r=1 minus r={second:g}: {_diff(d)}. " + ("The pooled intervals do not overlap: supported." if not
                                                           _overlap(c1, c2) else "The pooled intervals overlap: r = 1 "
                                                           "is best or tied, consistent with (i)."))
    cb, d = cells[(n0, best)], paired(cells, n0, 1.0, best)
    tied = _overlap(c1, cb)
    return (f"(i) At N = {n0} the best split is r = {best:g} ({_cell(cb)}), r = 1 reaches {_cell(c1)}; r=1 minus "
            f"r={best:g}: {_diff(d)}. " + ("Their pooled intervals overlap: r = 1 is tied with the best, "
                                          "consistent with (i)." if tied else "r = 1 is clearly behind: (i) is "
                                                                               "not reproduced."))


def finding_ii(cells: dict, budgets: list[int]) -> str:
    nl = budgets[-1]
    best_per = {n: _best(cells, n) for n in budgets}
    trend = ", ".join(f"N={n}: r={best_per[n]:g} ({cells[(n, best_per[n])]['mean']:.3f})" for n in budgets)
    falls = all(best_per[a] >= best_per[b] for a, b in zip(budgets, budgets[1:], strict=False))
    head = f"(ii) Best split per budget: {trend}; the best r {'never rises' if falls else 'does not fall steadily'} " \
           "as N grows. "
    if (nl, 1.0) not in cells:
        return head + f"No r = 1 trial at N = {nl}."
    c1, best = cells[(nl, 1.0)], best_per[nl]
    if best == 1.0:
        return head + f"At N = {nl} pure SFT is still best ({_cell(c1)}): no mix beats it; (ii) is not reproduced."
    cb, d = cells[(nl, best)], paired(cells, nl, best, 1.0)
    clear = not _overlap(cb, c1)
    return head + (f"At N = {nl}, r = {best:g} ({_cell(cb)}) is ahead of r = 1 ({_cell(c1)}), r={best:g} minus r=1: "
                   f"{_diff(d)}; " + ("the pooled intervals do not overlap: a mix wins, as in (ii)." if clear else
                                      "the pooled intervals overlap: the mix is ahead only within noise."))


def finding_iii(cells: dict, budgets: list[int]) -> str:
    lines = ["(iii) r = 0 (DPO straight on the base model) against r = 0.1 (and r = 0.01):"]
    for n in budgets:
        if (n, 0.0) not in cells:
            continue
        c0 = cells[(n, 0.0)]
        parts = [f"N = {n}: r=0 {_cell(c0)}, format misses {c0['misses']}/{c0['n']}"]
        for r in (0.01, 0.1):
            if (n, r) in cells:
                c = cells[(n, r)]
                parts.append(f"r={r:g} {_cell(c)}, misses {c['misses']}/{c['n']}, r={r:g} minus r=0 "
                             f"{_diff(paired(cells, n, r, 0.0))}" + ("" if _overlap(c, c0) else " (clear)"))
        lines.append("- " + "; ".join(parts) + ".")
    big = [n for n in budgets[1:] if (n, 0.0) in cells and (n, 0.1) in cells]
    if big:
        worse = [n for n in big if cells[(n, 0.1)]["wilson"][0] > cells[(n, 0.0)]["wilson"][1]]
        more_miss = [n for n in big if cells[(n, 0.0)]["misses"] > cells[(n, 0.1)]["misses"]]
        lines.append(f"- Verdict: r = 0 is clearly below r = 0.1 at N in {worse or 'none'} of {big}; r = 0 misses the "
                     f"format more often at N in {more_miss or 'none'}.")
        for n in big:  # the paper: under 10% SFT removes most of the cold-start gap
            c0, c1, cb = cells[(n, 0.0)], cells[(n, 0.1)], cells[(n, _best(cells, n))]
            gap = cb["mean"] - c0["mean"]
            if gap > 0:
                share = (c1["mean"] - c0["mean"]) / gap
                lines.append(f"- N = {n}: r = 0.1 closes {share:.0%} of the gap between r = 0 ({c0['mean']:.3f}) and "
                             f"the best split r = {_best(cells, n):g} ({cb['mean']:.3f}).")
    return "\n".join(lines)


def dpo_effect(rows: list[dict], budgets: list[int]) -> str:
    """What the DPO stage changed in the trials that ran both stages: accuracy after DPO minus after SFT."""
    both = [x for x in rows if 0 < x["r"] < 1 and x["accuracy_after_sft"] is not None and x["pref_pairs"]]
    if not both:
        return "DPO's own effect: no trial ran both stages."
    parts = []
    for n in budgets:
        xs = [x for x in both if x["budget"] == n]
        if xs:
            mean, half = t_interval([x["accuracy"] - x["accuracy_after_sft"] for x in xs])
            miss = [x["format_miss"] - x["format_miss_after_sft"] for x in xs if x["format_miss_after_sft"] is not None]
            parts.append(f"N={n}: {mean:+.3f} ± {half:.3f} accuracy, {statistics.fmean(miss):+.3f} format-miss share "
                         f"({len(xs)} trials)")
    return ("DPO's own effect (after DPO minus after SFT, same trial; mean ± 95% t over the trials with 0 < r < 1): "
            + "; ".join(parts) + ".")


def finding_iv(cells: dict, budgets: list[int]) -> str:
    best = {n: cells[(n, _best(cells, n))] for n in budgets}
    hits = []
    for (n, r), c in cells.items():
        smaller = [m for m in budgets if m < n and best[m]["mean"] >= c["mean"]]
        if smaller:
            m = smaller[0]
            clear = best[m]["wilson"][0] > c["wilson"][1]
            hits.append(f"N={m} at r={_best(cells, m):g} ({best[m]['mean']:.3f}) >= N={n} at r={r:g} "
                        f"({c['mean']:.3f})" + (" (clear: pooled intervals apart)" if clear else ""))
    if not hits:
        return "(iv) No smaller budget with its best split reaches any split of a larger budget: not reproduced."
    return "(iv) A smaller budget with its best split matches (mean >= mean) a larger budget with a worse split " \
           f"in {len(hits)} cases:\n" + "\n".join(f"- {h}" for h in hits)


def cpu_line() -> str:
    from unipipe_ray.runtime.devices import cpu_model

    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{cpu_model()}, {os.cpu_count()} cores" + (f", GPUs {gpu}" if gpu else "")


def base_model_text(model: str) -> str:
    info_path = Path(model).expanduser() / "allocation_base.json"
    if not info_path.exists():
        return (f"Base model: `{model}`. A model that already writes the \"#### n\" format (an instruct model) may "
                "show the cold start (iii) only weakly (docs/allocation.md).")
    info = json.loads(info_path.read_text())
    pre = info["pretrain"]
    return (f"Base model: `{model}`, built by experiments/allocation_base.py (results/allocation_repro_base.md): "
            f"Llama {info['layers']} blocks x {info['hidden']}, vocabulary {info['vocab_size']} (SmolLM2's tokenizer "
            f"trimmed to the task's tokens), {info['params'] / 1e6:.2f}M parameters, pretrained from scratch for "
            f"{pre['cpu_seconds'] / 60:.1f} CPU min ({pre['steps']} steps, {pre['tokens'] / 1e6:.1f}M tokens) on "
            "arith problems (other questions than the sweep's pool) answered in prose, never in the step/\"####\" "
            "format. Why: the paper starts from base models, and its cold start (iii) is DPO having to move the model "
            "to the answer format; a model that already writes the format (SmolLM2-Instruct) cannot show that, and "
            "a 135M model is too slow for a grid on 2 CPU cores (docs/allocation.md).")


PAPER_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.1, 0.01, 0.0)


def deviations(s: dict) -> str:
    missing = [f"{r:g}" for r in PAPER_RATIOS if r not in s["ratios"]]
    return (f"Against the paper's setup (docs/allocation.md): budgets {s['budgets']} instead of 100 to 10,000-20,000; "
            + (f"ratios {', '.join(missing)} not run; " if missing else "") + "full fine-tuning instead of LoRA "
            "r = 32; the arith task instead of GSM8K; lrs as in Setting (the paper: SFT 5e-5, DPO 5e-6); beta, "
            "epochs, schedule, warmup and batch 16 as in the paper.")


def report(result: dict) -> str:
    cells = {tuple(json.loads(k)): v for k, v in result["cells"].items()}
    budgets = sorted({b for b, _ in cells})
    s = result["setting"]
    lines = ["# Balancing the Budget: SFT/preference split of a fixed budget, reproduction", "",
             f"Machine: {result['machine']}; {result['note']}", "",
             f"Command: `{result['command']}`; experiment directory `{result['exp_dir']}` (Tune's own "
             f"sweep_report.md is there). {len(result['trials'])} finished trials; trial time {s['trial_s']}.", "",
             *([f"Trials without a result ({len(result['unfinished'])}): " + "; ".join(result["unfinished"]) + ".",
                ""] if result["unfinished"] else []),
             base_model_text(s["model"]), "",
             f"Setting: task arith (pool {s['pool']} questions, the same {s['eval_size']} held out for every trial, "
             f"greedy answers <= {s['max_new_tokens']} new tokens, checker \"#### n\"); budgets {s['budgets']}, SFT "
             f"ratios {s['ratios']}, seeds {s['seeds']} (which questions the budget draws and the training seed); SFT "
             f"{s['sft']}; DPO beta {s['beta']}, {s['dpo']}; DPO reference = the SFT model (base model at r = 0).", "",
             deviations(s), "",
             "Accuracy: mean over seeds ± 95% t half-width (over seeds), then [95% Wilson interval over all graded "
             "answers of the cell, held-out questions x seeds]. Format misses: answers without \"#### n\", summed "
             "over seeds. Pref acc: DPO implicit-reward accuracy on held-out pairs (mean over seeds). After SFT: "
             "accuracy of the SFT model before DPO (mean over seeds).", "",
             "| N | r | SFT ex. | pairs | accuracy | format misses | pref acc | after SFT |",
             "|---|---|---|---|---|---|---|---|"]
    for (n, r), c in cells.items():
        one = next(iter(c["seeds"].values()))
        sft = [x["accuracy_after_sft"] for x in c["seeds"].values() if x["accuracy_after_sft"] is not None]
        pref = "-" if c["pref_accuracy"] is None else f"{c['pref_accuracy']:.3f}"
        after = f"{statistics.fmean(sft):.3f}" if sft else "-"
        lines.append(f"| {n} | {r:g} | {one['sft_examples']} | {one['pref_pairs']} | {_cell(c)} | "
                     f"{c['misses']}/{c['n']} | {pref} | {after} |")
    lines += ["", "## Findings", "", finding_i(cells, budgets), "", finding_ii(cells, budgets), "",
              finding_iii(cells, budgets), "", finding_iv(cells, budgets), "",
              dpo_effect(result["trials"], budgets), ""]
    return "\n".join(lines) + "\n"


def unfinished(exp_dirs: list[Path]) -> list[str]:
    """One line per errored or unfinished trial: its parameters and the exception line Tune kept."""
    from unipipe_ray.tune.trials import load_trials

    return [f"budget={r['params'].get('budget')}, r={r['params'].get('sft_ratio')}, seed={r['params'].get('seed')}: "
            f"{r['status']}" + (f" ({r['note']})" if r["note"] else "")
            for d in exp_dirs for r in load_trials(d) if r["status"] != "done"]


def merged_rows(exp_dir: Path, names: list[str]) -> list[dict]:
    """Finished trials of the sweep and of the experiments `names` beside it (e.g. more seeds run later under
    another name), which must share its base pipeline: only the searched values may differ."""
    rows, base = trial_rows(exp_dir), json.loads((exp_dir / "unipipe_tune.json").read_text())["base"]
    for name in names:
        other = exp_dir.parent / name
        if json.loads((other / "unipipe_tune.json").read_text())["base"] != base:
            sys.exit(f"{other} ran another base pipeline than {exp_dir}: its trials cannot be pooled")
        rows += trial_rows(other)
    keys = {(x["budget"], x["r"], x["seed"]) for x in rows}
    if len(keys) < len(rows):
        sys.exit("the merged experiments hold the same (budget, r, seed) twice")
    return sorted(rows, key=lambda x: (x["budget"], -x["r"], x["seed"]))


def setting_of(exp_dir: Path, rows: list[dict]) -> dict:
    """The grid and hyperparameters, from the config run_tune stored in the experiment directory."""
    cfg = json.loads((exp_dir / "unipipe_tune.json").read_text())
    base, space = cfg["base"], cfg["space"]
    train = lambda t: (f"{t['epochs']:g} epochs, batch {t['batch_size']}, lr {t['lr']:g}, warmup {t['warmup_ratio']:g} "
                       f"+ cosine{', GPU' if t['use_gpu'] else ''}")
    grid = lambda key: (space.get(key) or {}).get("grid", space.get(key))
    return {"model": base["model"], "pool": base["sft"]["data"]["task_size"], "eval_size": base["eval_size"],
            "max_new_tokens": base["eval_max_new_tokens"], "budgets": grid("budget"), "ratios": grid("sft_ratio"),
            "seeds": sorted({x["seed"] for x in rows}), "sft": train(base["sft"]["train"]),
            "dpo": train(base["dpo"]["train"]),
            "beta": base["dpo"]["beta"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG), help="the sweep YAML")
    p.add_argument("--model", help="model spec (default: the allocation_base checkpoint in the cache dir)")
    p.add_argument("--gpu", action="store_true", help="train on GPUs with the paper's lrs (a pretrained model)")
    p.add_argument("--name", help="experiment name (default allocation_cpu / allocation_gpu_<model>)")
    p.add_argument("--budgets", type=int, nargs="+", help="replace the YAML's budget grid")
    p.add_argument("--ratios", type=float, nargs="+", help="replace the YAML's sft_ratio grid")
    p.add_argument("--seeds", type=int, nargs="+", help="replace the YAML's seed grid")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more TuneConfig overrides")
    p.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    p.add_argument("--merge", nargs="*", default=[], metavar="NAME",
                   help="pool the finished trials of these experiments (same base, e.g. more --seeds) in the results")
    p.add_argument("--report-only", action="store_true", help="only rewrite the results from the experiment dir")
    p.add_argument("--out", help="results path without suffix (default results/allocation_repro, with --gpu "
                                 "results/allocation_repro_gpu)")
    p.add_argument("--note", default="shared with other jobs, run under nice -n 19", help="a line on the machine")
    args = p.parse_args()
    args.out = args.out or str(ROOT / ("results/allocation_repro_gpu" if args.gpu else "results/allocation_repro"))
    import time

    start = time.time()
    exp_dir = run_sweep(args)
    rows, dirs = merged_rows(exp_dir, args.merge), [exp_dir] + [exp_dir.parent / n for n in args.merge]
    if not rows:
        sys.exit(f"{exp_dir}: no finished trial yet")
    seconds = sorted(x["seconds"] for x in rows if x["seconds"] is not None)
    span = (max(x["end"] or 0 for x in rows) - min(x["start"] for x in rows)) / 60
    setting = {**setting_of(exp_dir, rows), "trial_s": f"median {statistics.median(seconds):.0f} s, "
               f"{sum(seconds) / 60:.0f} min in all, first start to last end {span:.0f} min (trials side by side)"}
    cells = cells_of(rows)
    argv = [a for a in sys.argv[1:] if a != "--report-only"]
    if "--note" in argv:  # the note is printed on its own line
        del argv[argv.index("--note"):argv.index("--note") + 2]
    result = {"command": "nice -n 19 python experiments/allocation_repro.py " + " ".join(argv),
              "machine": cpu_line(),
              "note": args.note,
              "exp_dir": ", ".join(map(str, dirs)), "setting": setting, "unfinished": unfinished(dirs),
              "this_run_s": round(time.time() - start),
              "cells": {json.dumps([n, r]): {k: v for k, v in c.items() if k != "seeds"} | {"seeds": c["seeds"]}
                        for (n, r), c in cells.items()}, "trials": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    Path(args.out + ".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
