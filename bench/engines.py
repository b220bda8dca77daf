"""Rollout engines side by side: our vLLM engine, bare vLLM, our HF engine, plain Hugging Face ``generate``.

    python bench/engines.py --model smollm2-135m --prompts 64 --new-tokens 128 --dtype bfloat16 --repeats 3 \
        --out results/bench_engines_cpu.md

Every side samples --new-tokens at temperature 1 for the same --prompts chat prompts (HH-RLHF harmless first
turns, or the built-in arith task) in one batch, stopping at EOS. Each (side, repeat) runs in a fresh
subprocess (vLLM's in-process engine reserves its KV cache per process), the sides in rotated order each
repeat, so machine load hits all of them alike. Startup and one small warm-up generation are untimed.
Throughput = generated tokens (EOS included, nothing after it) / wall seconds of the timed call.

Sides:
  ours-vllm       ppo.rollout.VLLMEngine.generate (what the PPO stage runs; log-probs on)
  bare-vllm       vllm.LLM.generate with the same SamplingParams minus logprobs
  ours-hf         ppo.rollout.HFEngine.generate (our decode loop)
  plain-generate  model.generate(do_sample=True, top_k=0), left-padded batch, KV cache, no log-probs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES = ("ours-vllm", "bare-vllm", "ours-hf", "plain-generate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny | checkpoint dir")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--data", default="hh", choices=("hh", "arith"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per side")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where ours-hf and plain-generate run (auto: cuda when there is one, else cpu; "
                        "the vLLM sides take vLLM's own device)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    p.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    p.add_argument("--out", default=None, help="markdown report; the .json goes beside it")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one measurement
    return p.parse_args(argv)


def prompt_ids(args, tokenizer) -> list[list[int]]:
    from unipipe_ray.data import get_task, tokenize_prompt

    if args.data == "hh":
        root = Path(os.environ.get("UNIPIPE_SHARED_DATA", "/work/shared/data"))
        task = get_task("hh_harmless", path=str(root / "hh-rlhf-harmless" / "test.jsonl.gz"))
    else:
        task = get_task("arith", n=args.prompts * 2)
    prompts = task.prompts()[:args.prompts]
    if len(prompts) < args.prompts:
        raise SystemExit(f"only {len(prompts)} prompts available, --prompts {args.prompts}")
    return [tokenize_prompt(p, tokenizer, 256)["input_ids"] for p in prompts]


def measure(args) -> dict:
    """One side, in this process: load, warm up, time one batched generation."""
    import torch

    from unipipe_ray.core.models import load_tokenizer, resolve_model

    path = str(resolve_model(args.model))
    prompts = prompt_ids(args, load_tokenizer(args.model))
    threads = args.threads
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    if args.side in ("ours-vllm", "ours-hf"):
        from unipipe_ray.ppo.rollout import make_rollout_engine

        where = {"device": device} if args.side == "ours-hf" else {}
        engine = make_rollout_engine(args.side.removeprefix("ours-"), path, dtype=args.dtype, threads=threads,
                                     **where)
        run = lambda ps, t: [len(s.response_ids) for s in engine.generate(ps, 1, t, 1.0)]  # noqa: E731
    elif args.side == "bare-vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=path, dtype=args.dtype, seed=0, enforce_eager=True, max_model_len=2048,
                  gpu_memory_utilization=0.15)

        def run(ps, t):
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                                SamplingParams(max_tokens=t, temperature=1.0), use_tqdm=False)
            return [len(o.outputs[0].token_ids) for o in outs]
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device).eval()
        tok = AutoTokenizer.from_pretrained(path)

        @torch.no_grad()
        def run(ps, t):
            width = max(map(len, ps))
            ids = torch.full((len(ps), width), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(ps):
                ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
            ids, mask = ids.to(device), mask.to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=t, pad_token_id=tok.pad_token_id)
            lengths = []
            for row in out[:, width:].tolist():
                lengths.append(row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row))
            return lengths
    startup = time.perf_counter() - start
    run(prompts[:4], 8)  # warm-up: first-call kernel selection, allocator
    start = time.perf_counter()
    lengths = run(prompts, args.new_tokens)
    seconds = time.perf_counter() - start
    return {"side": args.side, "device": device if args.side in ("ours-hf", "plain-generate") else "vllm's",
            "seconds": seconds, "tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds,
            "mean_length": statistics.mean(lengths), "startup_s": startup, "load_avg": os.getloadavg()[0]}


def machine() -> dict:
    import torch
    import transformers

    from unipipe_ray.runtime.devices import cpu_model

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = None
    return info


def report(args, runs: list[dict], info: dict) -> str:
    by_side = {s: [r for r in runs if r["side"] == s] for s in args.sides.split(",")}
    median = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in by_side.items() if rs}
    hf_sides = [r for r in runs if r["side"] in ("ours-hf", "plain-generate")]
    devices = ", ".join(sorted({r.get("device", "cpu") for r in hf_sides})) or "-"
    lines = [f"# Rollout engines: {args.model}, {args.prompts} prompts x {args.new_tokens} new tokens, "
             f"{args.dtype}", "",
             f"Measured {datetime.date.today()} on {info['cpu']} ({info['cores']} cores), GPU: {info['gpu']}; "
             f"torch {info['torch']}, transformers {info['transformers']}, vLLM {info['vllm']}; ours-hf and "
             f"plain-generate on {devices}. "
             f"Command: `python bench/engines.py {' '.join(sys.argv[1:])}`.", "",
             "| side | tokens/s (median) | each repeat | mean response length | startup s | load avg |",
             "|---|---|---|---|---|---|"]
    for side, rs in by_side.items():
        if rs:
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
            loads = ", ".join(f"{r['load_avg']:.1f}" for r in rs)
            lines.append(f"| {side} | {median[side]:.0f} | {each} | {statistics.mean(r['mean_length'] for r in rs):.1f}"
                         f" | {statistics.mean(r['startup_s'] for r in rs):.1f} | {loads} |")
    lines.append("")
    if "ours-vllm" in median and "bare-vllm" in median:
        lines.append(f"- ours-vllm / bare-vllm: {median['ours-vllm'] / median['bare-vllm']:.2f} "
                     "(target: within 10%, i.e. >= 0.90)")
    if "ours-hf" in median and "plain-generate" in median:
        lines.append(f"- ours-hf / plain-generate: {median['ours-hf'] / median['plain-generate']:.2f} "
                     "(target: >= 2)")
    lines.extend(f"- {note}" for note in args.note)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return 0
    sides = args.sides.split(",")
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"--sides: unknown {sorted(unknown)}; expected {SIDES}")
    runs = []
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    for repeat in range(args.repeats):
        order = sides[repeat % len(sides):] + sides[:repeat % len(sides)]  # rotate: no side always first
        for side in order:
            proc = subprocess.run([sys.executable, __file__, *base, "--side", side], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs.append(json.loads(line.removeprefix("RESULT ")) | {"repeat": repeat})
            print(f"repeat {repeat} {side}: {runs[-1]['tokens_per_s']:.0f} tokens/s "
                  f"(mean length {runs[-1]['mean_length']:.1f})", flush=True)
    info = machine()
    text = report(args, runs, info)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "machine": info,
                                                                   "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
