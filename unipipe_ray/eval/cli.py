"""`unipipe eval` and `unipipe select`: argument parsing and file output around eval/evaluate.py and
eval/select.py. No Ray: both run in this process (generation and scoring are single-model jobs).

    unipipe eval --model PATH --task NAME [--task-path FILE] [--n N] [--reward-model PATH]
                 [--baseline-model PATH] [--ref-model PATH --beta B] [--pairs FILE] [--out FILE]
    unipipe select --input FILE --k K --out FILE.jsonl [--method ensemble|margin]
                   [--reward-models P [P ...]] [--model POLICY --ref-model REF --beta B]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unipipe_ray.runtime.files import write_text_atomic

COMMANDS = ("eval", "select")


def add_parsers(sub) -> None:
    """Register both subcommands on the `unipipe` subparsers."""
    e = sub.add_parser("eval", help="evaluate a model on held-out data, figures with bootstrap 95%% intervals")
    e.add_argument("--model", required=True, help="model spec or checkpoint directory to evaluate (A)")
    e.add_argument("--task", required=True, choices=("arith", "gsm8k", "hh_harmless"), help="built-in task")
    e.add_argument("--task-path", help="data file of a file-backed task (gsm8k, hh_harmless)")
    e.add_argument("--n", type=int, default=64, help="held-out examples (the stages' split: first N of the "
                   "seeded shuffle, so N <= the stage's data.eval_size keeps them unseen)")
    e.add_argument("--seed", type=int, default=0, help="data.seed of the stages (split) and bootstrap seed")
    e.add_argument("--reward-model", help="RM checkpoint: its accuracy on the pairs, its score of the answers, "
                   "and the judge of the win rate")
    e.add_argument("--baseline-model", help="model B: evaluated too, compared with paired tests, win rate of A")
    e.add_argument("--ref-model", help="reference model: preference accuracy of A's DPO implicit reward")
    e.add_argument("--beta", type=float, default=0.1, help="DPO beta of the implicit reward")
    e.add_argument("--pairs", help="held-out preference pairs (default: the task's held-out pairs)")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--max-length", type=int, default=512, help="tokens per scored sequence")
    e.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="generation engine (greedy)")
    e.add_argument("--n-resamples", type=int, default=2000, help="bootstrap resamples")
    e.add_argument("--out", default="eval.json", help="result JSON (a markdown table goes next to it, .md)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser("select", help="rank unlabeled pairs by model uncertainty; top k as JSONL to annotate")
    s.add_argument("--input", required=True, help="candidate pairs or prompts (JSONL etc.)")
    s.add_argument("--k", type=int, required=True, help="how many to select (the annotation budget)")
    s.add_argument("--out", required=True, help="output JSON Lines file")
    s.add_argument("--method", choices=("ensemble", "margin"), default="ensemble")
    s.add_argument("--reward-models", nargs="+", default=[], metavar="PATH", help="reward-model checkpoints")
    s.add_argument("--model", help="policy: DPO policy of the margin method; samples responses for prompts")
    s.add_argument("--ref-model", help="reference model of the DPO implicit reward")
    s.add_argument("--beta", type=float, default=0.1)
    s.add_argument("--max-length", type=int, default=512)
    s.add_argument("--max-new-tokens", type=int, default=128, help="length of responses sampled for prompts")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run `eval` or `select`; bad input (files, records, options) prints one line and returns 2."""
    from unipipe_ray.data import DataError

    try:
        return _eval(args) if args.command == "eval" else _select(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"unipipe {args.command}: {e}", file=sys.stderr)
        return 2


def _held_out(args) -> tuple:
    """(task, held-out SFT examples, held-out pairs or None): the stages' own split (data.held_out) of the
    task's data at ``--seed``, or the pairs of ``--pairs``."""
    from unipipe_ray.config import DataConfig
    from unipipe_ray.data import load_examples
    from unipipe_ray.data.held_out import held_out

    if args.task != "arith" and not args.task_path:
        raise ValueError(f"--task {args.task} reads a data file: pass --task-path")
    data = DataConfig(task=args.task, task_path=args.task_path, eval_size=args.n, seed=args.seed)
    wants_pairs = bool(args.reward_model or args.ref_model)
    task, examples, pairs = held_out(data, args.n, data if wants_pairs and not args.pairs else None)
    if wants_pairs and args.pairs:
        pairs = load_examples("preference", [(args.pairs, 1.0)])[0]
    return task, examples, pairs if wants_pairs else None


def _eval(args) -> int:
    from unipipe_ray.eval.evaluate import evaluate_model, generate_completions, judge_scores, win_rate_of
    from unipipe_ray.eval.summary import compare, without_scores

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    task, examples, pairs = _held_out(args)
    progress = not args.no_progress
    kw = dict(n_resamples=args.n_resamples, seed=args.seed)
    gen = lambda model: generate_completions(model, examples, args.max_new_tokens, engine=args.engine,
                                             progress=progress)
    completions = {"A": gen(args.model)}
    results = {"A": evaluate_model(args.model, task, examples, pairs=pairs, reward_model=args.reward_model,
                                   ref_model=args.ref_model, beta=args.beta, completions=completions["A"],
                                   max_length=args.max_length, progress=progress, **kw)}
    record = {"model": args.model, "task": args.task, "n": len(examples), "settings": vars(args)}
    if args.baseline_model:
        completions["B"] = gen(args.baseline_model)
        # B's rm_accuracy would repeat A's (same RM, same pairs): only generation figures are compared.
        results["B"] = evaluate_model(args.baseline_model, task, examples, reward_model=args.reward_model,
                                      completions=completions["B"], max_length=args.max_length,
                                      progress=progress, **kw)
        record["comparison_A_minus_B"] = compare(results["B"], results["A"], **kw)
        if args.reward_model or task.has_gold_reward:
            scores = [judge_scores(examples, completions[m], args.reward_model, task, args.max_length, progress)
                      for m in ("A", "B")]
            record["win_rate_A_over_B"] = {k: v for k, v in win_rate_of(*scores, **kw).items() if k != "scores"}
            record["win_rate_A_over_B"]["judge"] = args.reward_model or "gold checker"
    record["metrics"] = {m: without_scores(r) for m, r in results.items()}
    record["completions"] = completions
    markdown = _markdown(args, results, record.get("win_rate_A_over_B"), len(examples))
    out = Path(args.out)
    write_text_atomic(out, json.dumps(record, indent=2) + "\n")
    write_text_atomic(out.with_suffix(".md"), markdown)
    print(markdown + f"\nresult: {out} (+ {out.with_suffix('.md')})")
    return 0


def _markdown(args, results: dict, win: dict | None, n: int) -> str:
    from unipipe_ray.eval.summary import markdown_table

    table = markdown_table(results, baseline="B" if "B" in results else None, n_resamples=args.n_resamples,
                           seed=args.seed)
    names = f"A = {args.model}" + (f", B = {args.baseline_model}" if args.baseline_model else "")
    text = f"# unipipe eval: {args.task}, {n} held-out examples\n\n{names}\n\n{table}\n"
    if win is not None:
        text += (f"\nwin rate of A over B ({win['judge']}): {win['estimate']:.3f} [{win['low']:.2f}, "
                 f"{win['high']:.2f}] (wins {win['wins']}, losses {win['losses']}, ties {win['ties']}; "
                 f"sign test p={win['p_value']:.3g})\n")
    return text


def _select(args) -> int:
    from unipipe_ray.eval.select import (
        implicit_margins,
        ranked_rows,
        read_candidates,
        rm_margins,
        sample_responses,
        write_jsonl,
    )

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    dpo = bool(args.model and args.ref_model)
    if args.method == "ensemble" and len(args.reward_models) < 2:
        raise ValueError("--method ensemble needs at least 2 --reward-models")
    if args.method == "margin" and not (dpo or args.reward_models):
        raise ValueError("--method margin needs --model and --ref-model (DPO implicit reward) or --reward-models")
    candidates = read_candidates(args.input)
    unsampled = [c for c in candidates if c.response_a is None]
    if unsampled and not args.model:
        raise ValueError(f"{unsampled[0].source}: a prompt without responses: pass --model to sample two")
    candidates = sample_responses(candidates, args.model, args.max_new_tokens, seed=args.seed) if unsampled \
        else candidates
    progress = not args.no_progress
    if args.method == "margin" and dpo:
        margins = implicit_margins(candidates, args.model, args.ref_model, args.beta, args.max_length, progress)
    else:
        margins = rm_margins(candidates, args.reward_models, args.max_length, progress)
    rows = ranked_rows(candidates, margins, args.method, args.k)
    write_jsonl(rows, args.out)
    note = f" (only {len(candidates)} candidates)" if args.k > len(candidates) else ""
    print(f"unipipe select: wrote the {len(rows)} most uncertain of {len(candidates)} candidates{note} "
          f"by {args.method} to {args.out}")
    return 0
