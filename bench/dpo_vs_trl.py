"""One DPO training step: unipipe_ray vs TRL's DPOTrainer, same model, pairs, batches, device and dtype.

    python bench/dpo_vs_trl.py --model tiny --data hh --pairs-per-step 8 --max-length 512 --steps 30 \
        --device cpu --dtype float32 --out results/bench_dpo_cpu.md

Sides: "trl" (DPOTrainer.train(), explicit ref_model), "ours-full" (core.forward without a chunk size: full
logits, what the stage runs under ZeRO-3 or with logps_chunk_size 0), "ours-chunked" (core.forward with
--chunk-size: no (B, T, V) logits; padded batches) and "ours-packed" (chunked, and every forward, policy and
reference, runs on the pairs packed without padding: train.packing). All start from the same weights
and take the same batches in the same order. Timing: one process runs TRL's own train loop, and a
callback runs one step of each of our sides after every TRL step (A B C A B C ...), so machine load hits
all sides alike. Memory: one fresh subprocess per side (peak above the state after setup). See README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# side -> (uses --chunk-size (else full logits), packs its forwards)
OURS = {"ours-full": (False, False), "ours-chunked": (True, False), "ours-packed": (True, True)}
SIDES = ("trl", *OURS)
# Qwen2-0.5B's shape at random init (no weights to carry; throughput does not need trained ones), with
# SmolLM2's tokenizer: its ids (< 49,152) are valid rows of Qwen2's 151,936-row embedding.
QWEN2_SHAPE = "qwen2-0.5b-shape"
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)


def chosen(args) -> list[str]:
    sides = [s.strip() for s in args.ours.split(",") if s.strip()]
    unknown = set(sides) - set(OURS)
    if unknown or not sides:
        raise SystemExit(f"--ours: unknown or no sides {sorted(unknown)}; choose from {', '.join(OURS)}")
    return sides


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help=f"tiny | smollm2-135m | {QWEN2_SHAPE} | checkpoint dir")
    p.add_argument("--data", default="hh", choices=("arith", "hh"))
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the chunked LM head")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--precompute-ref", action="store_true", help="reference log-probs once up front (both)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps per memory subprocess (0: skip)")
    p.add_argument("--ours", default=",".join(OURS),
                   help="our sides to run beside TRL (comma-separated; fewer sides, less memory in the timing process)")
    p.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    p.add_argument("--out", default=None, help="markdown report; the .json goes beside it")
    p.add_argument("--probe", choices=SIDES, help=argparse.SUPPRESS)  # internal: memory subprocess
    return p.parse_args(argv)


# ---------------------------------------------------------------- data and models (shared by all sides)

def load_features(args, tokenizer, n_pairs: int) -> list[dict]:
    from unipipe_ray.data import get_task, tokenize_all

    if args.data == "arith":
        pairs = get_task("arith", n=2 * n_pairs, seed=0).preference_pairs()
    else:
        root = Path(os.environ.get("UNIPIPE_SHARED_DATA", "/work/shared/data"))
        pairs = get_task("hh_harmless", path=root / "hh-rlhf-harmless" / "test.jsonl.gz").preference_pairs()
        random.Random(0).shuffle(pairs)  # a fixed, representative draw rather than the file's first rows
    features = []
    for i in range(0, len(pairs), n_pairs):  # tokenize only as many as needed (pairs may be skipped)
        features += tokenize_all(pairs[i:i + n_pairs], "preference", tokenizer, args.max_length, on_bad_record="skip")
        if len(features) >= n_pairs:
            return features[:n_pairs]
    raise SystemExit(f"only {len(features)} usable pairs; need {n_pairs} (fewer --steps or --pairs-per-step)")


def load_tokenizer_of(model: str):
    from unipipe_ray.core.models import load_tokenizer

    return load_tokenizer("smollm2-135m" if model == QWEN2_SHAPE else model)


def load_model(args):
    from unipipe_ray.core.models import load_causal_lm

    if args.model != QWEN2_SHAPE:
        return load_causal_lm(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = load_tokenizer_of(args.model)
    config = Qwen2Config(**QWEN2_05B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)  # the same weights in every call (policy, reference, each side, each process)
    with torch.device(args.device):  # initialised where it runs: no 0.5B-parameter init on the CPU
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))


def load_models(args):
    """(policy in train mode, frozen reference), same weights, on the device."""
    return load_model(args).train(), load_model(args).eval().requires_grad_(False)


def clock(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- our side

class OurSide:
    """Our DPO step: forward.py policy forward, no_grad reference, dpo_loss, TrainingEngine backward + AdamW step."""

    def __init__(self, args, features, pad_id, chunk_size, total_steps, packing=False):
        from unipipe_ray.runtime.engine import TrainingEngine

        policy, self.ref = load_models(args)
        # TrainingEngine: the stage's AdamW + clipping + warmup/cosine schedule, a plain module on one process
        self.engine = TrainingEngine(policy, args.lr, weight_decay=0.0, max_grad_norm=1.0, total_steps=total_steps,
                             warmup_steps=0)
        self.args, self.features, self.pad_id, self.chunk_size = args, features, pad_id, chunk_size
        self.packing = packing
        self.ref_table = None
        if args.precompute_ref:  # untimed, like TRL's precompute in its __init__
            self.ref_table = [self._ref_logps(self._batch(k)) for k in range(total_steps)]
            self.ref = None

    def _batch(self, k):
        from unipipe_ray.data import collate_preference

        B = self.args.pairs_per_step
        batch = collate_preference(self.features[k * B:(k + 1) * B], self.pad_id)
        return {key: v.to(self.args.device) for key, v in batch.items()}

    @torch.no_grad()
    def _ref_logps(self, batch):
        from unipipe_ray.core.forward import sequence_pair_logps

        return sequence_pair_logps(self.ref, self.ref, batch, self.chunk_size, packing=self.packing)

    def step(self, k: int) -> dict:
        from unipipe_ray.core.forward import sequence_pair_logps
        from unipipe_ray.core.losses import dpo_loss

        start = clock(self.args.device)
        batch = self._batch(k)
        policy = sequence_pair_logps(self.engine, self.engine.module, batch, self.chunk_size, packing=self.packing)
        ref = self.ref_table[k] if self.ref_table is not None else self._ref_logps(batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(*policy, *ref, beta=self.args.beta)
        self.engine.backward(losses.mean())
        self.engine.step()
        # the few scalars a training loop reports (TRL reports more), read back like a logger would
        margin = float((chosen_rewards - rejected_rewards).mean())
        return {"time": clock(self.args.device) - start, "loss": float(losses.detach().mean()), "margin": margin,
                "logps_chosen": float(policy[0].detach().mean())}


# ---------------------------------------------------------------- TRL's side

def make_trl(args, features, total_steps, tokenizer, callbacks=()):
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on our token ids (no re-tokenization: both sides see the same tokens) and in order (both
        sides see the same batches). Everything else is TRL's own loop."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for f in features:
        n = f["chosen_labels"].count(-100)  # the prompt is the masked prefix (shared by both responses)
        rows["prompt_ids"].append(f["chosen_input_ids"][:n])
        rows["chosen_ids"].append(f["chosen_input_ids"][n:])
        rows["rejected_ids"].append(f["rejected_input_ids"][n:])
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=args.pairs_per_step,
        max_steps=total_steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,  # = runtime.engine.TrainingEngine
        beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
        precompute_ref_log_probs=args.precompute_ref,
        # TRL defaults to gradient checkpointing and bf16 autocast; ours does neither: same work on both sides
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=args.device == "cpu",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    policy, ref = load_models(args)
    return PretokenizedDPOTrainer(model=policy, ref_model=ref, args=config, processing_class=tokenizer,
                                  train_dataset=Dataset.from_dict(rows), callbacks=list(callbacks))


def trl_metrics(trainer) -> dict:
    m = trainer._metrics["train"]  # TRL keeps per-step values here until it logs (never, with logging off)
    return {"margin": m["rewards/margins"][-1], "logps_chosen": m["logps/chosen"][-1]}


# ---------------------------------------------------------------- timing (all sides, one process) and memory

def timing_run(args, tokenizer, features, total) -> dict[str, list[dict]]:
    from transformers import TrainerCallback

    ours = {side: OurSide(args, features, tokenizer.pad_token_id, args.chunk_size if chunked else None, total,
                          packing) for side, (chunked, packing) in OURS.items() if side in chosen(args)}
    log: dict[str, list[dict]] = {side: [] for side in ("trl", *ours)}

    class Interleave(TrainerCallback):
        """After each TRL step: record its time (since the end of our last step), then one step per side of
        ours on the same batch, in alternating order."""

        def on_train_begin(self, *_, **__):
            self.mark = clock(args.device)

        def on_step_end(self, _args, state, control, **kwargs):
            k = state.global_step - 1
            log["trl"].append({"time": clock(args.device) - self.mark, **trl_metrics(trainer)})
            for side in (list(ours) if k % 2 == 0 else list(ours)[::-1]):
                log[side].append(ours[side].step(k))
            print(f"step {k + 1}/{total}: " + ", ".join(f"{side} {log[side][-1]['time']:.2f} s" for side in log),
                  file=sys.stderr, flush=True)
            self.mark = clock(args.device)

    trainer = make_trl(args, features, total, tokenizer, [Interleave()])
    trainer.train()
    return log


def _proc_status_mb(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def memory_probe(args, tokenizer, features) -> dict:
    """In a fresh process: set up one side, reset the peak, run --memory-steps steps, return the peak."""
    import gc

    steps = args.memory_steps
    if args.probe == "trl":
        trainer = make_trl(args, features, steps, tokenizer)
        run = trainer.train
    else:
        chunked, packing = OURS[args.probe]
        side = OurSide(args, features, tokenizer.pad_token_id, args.chunk_size if chunked else None, steps, packing)
        run = lambda: [side.step(k) for k in range(steps)]
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, method = torch.cuda.memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the RSS high-water mark to the current RSS
        base, method = _proc_status_mb("VmRSS"), "VmHWM (peak RSS) after /proc/self/clear_refs"
    run()
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else _proc_status_mb("VmHWM")
    return {"side": args.probe, "baseline_mb": base, "peak_mb": peak, "step_peak_mb": peak - base, "method": method}


def measure_memory(argv: list[str]) -> dict[str, dict]:
    out = {}
    for side in ("trl", *chosen(parse_args(argv))):
        proc = subprocess.run([sys.executable, __file__, *argv, "--probe", side], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory probe {side} failed:\n{proc.stderr[-3000:]}")
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- summary and report

def summarize(args, log, tokens, completion_tokens, positions, memory) -> dict:
    w = args.warmup
    sides = {}
    for side in log:
        times = [r["time"] for r in log[side][w:]]
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        sides[side] = {"s_per_step_median": statistics.median(times), "s_per_step_p25": q1, "s_per_step_p75": q3,
                       "s_per_step_min": min(times), "s_per_step_max": max(times),
                       "tokens_per_s": sum(tokens[w:]) / sum(times), "times": times, **memory.get(side, {})}
    trl = sides["trl"]
    ours = [side for side in log if side != "trl"]
    for side in ours:
        s = sides[side]
        s["speedup_tokens_per_s"] = s["tokens_per_s"] / trl["tokens_per_s"]
        s["speedup_paired_median"] = statistics.median(t / o for t, o in zip(trl["times"], s["times"], strict=True))
        if "step_peak_mb" in s and "step_peak_mb" in trl:
            s["memory_ratio"] = s["step_peak_mb"] / max(trl["step_peak_mb"], 1e-9)
        # same batches, same weights, same optimizer math: the two loops must report the same numbers
        s["max_abs_diff_vs_trl"] = {key: max(abs(a[key] - b[key]) for a, b in zip(log[side], log["trl"], strict=True))
                                    for key in ("margin", "logps_chosen")}
    best = max(ours, key=lambda side: sides[side]["tokens_per_s"])
    packing = {}
    if {"ours-packed", "ours-chunked"} <= set(ours):
        packing = {"packed_over_padded": sides["ours-packed"]["tokens_per_s"] / sides["ours-chunked"]["tokens_per_s"],
                   "packed_paired_median": statistics.median(c / p for c, p in zip(
                       sides["ours-chunked"]["times"], sides["ours-packed"]["times"], strict=True))}
    return {"sides": sides, "default": best, "target_met": sides[best]["speedup_tokens_per_s"] >= 1.3, **packing,
            "first_loss": log[ours[0]][0]["loss"], "tokens_per_step_median": statistics.median(tokens[w:]),
            "completion_tokens_per_step_median": statistics.median(completion_tokens[w:]),
            "lm_head_positions_per_step_median": statistics.median(positions[w:])}


def machine(args) -> dict:
    import transformers
    import trl

    from unipipe_ray.runtime.devices import cpu_model

    info = {"cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_avg_1m": os.getloadavg()[0]}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def render(report: dict) -> str:
    lines = ["# DPO step: unipipe_ray vs TRL DPOTrainer", "",
             "Generated by `bench/dpo_vs_trl.py` (see `bench/README.md`). One section per configuration.", ""]
    for run in report["runs"]:
        m, c, s = run["machine"], run["config"], run["summary"]
        lines += [f"## {c['model']}, {c['data']}, {c['pairs_per_step']} pairs x <= {c['max_length']} tokens, "
                  f"{c['device']} {c['dtype']}", "",
                  f"- machine: {m.get('gpu', m['cpu'])}, {m['cores']} cores, torch {m['torch']}, transformers "
                  f"{m['transformers']}, trl {m['trl']}, {m['date']}, load average (1 min) at start / end "
                  f"{m['load_avg_1m']:.1f} / {m.get('load_avg_1m_end', float('nan')):.1f}",
                  f"- command: `{run['command']}`",
                  f"- {c['warmup']} warmup + {c['steps']} timed steps per side, interleaved; chunk size "
                  f"{c['chunk_size']}; reference {'precomputed' if c['precompute_ref'] else 'run every step'}; "
                  f"lr {c['lr']}, beta {c['beta']}", "",
                  "| side | s/step median | p25 - p75 | tokens/s | ours/TRL tokens/s | paired median | "
                  "step peak memory MB | peak MB (process) |",
                  "|---|---|---|---|---|---|---|---|"]
        for side, r in s["sides"].items():
            ratio = f"{r['speedup_tokens_per_s']:.2f}x" if side != "trl" else "1"
            paired = f"{r['speedup_paired_median']:.2f}x" if side != "trl" else "1"
            mem = (f"{r['step_peak_mb']:.0f}", f"{r['peak_mb']:.0f}") if "step_peak_mb" in r else ("-", "-")
            lines.append(f"| {side} | {r['s_per_step_median']:.3f} | {r['s_per_step_p25']:.3f} - "
                         f"{r['s_per_step_p75']:.3f} | {r['tokens_per_s']:.0f} | {ratio} | {paired} | "
                         f"{mem[0]} | {mem[1]} |")
        diffs = {side: r["max_abs_diff_vs_trl"] for side, r in s["sides"].items() if side != "trl"}
        lines += ["", f"- per step (median): {s['tokens_per_step_median']:.0f} non-pad tokens (what tokens/s counts, "
                  f"same batches on every side), {s['completion_tokens_per_step_median']:.0f} of them scored "
                  f"(response tokens), {s['lm_head_positions_per_step_median']:.0f} positions in the padded batch"
                  + (f", {s['packed_positions_per_step_median']:.0f} packed" if "packed_positions_per_step_median" in s
                     else ""),
                  f"- default: **{s['default']}**; target ours >= 1.3x TRL tokens/s: "
                  f"**{'met' if s['target_met'] else 'not met'}**",
                  f"- same numbers on both sides: first loss {s['first_loss']:.4f} (ln 2 = 0.6931); max |ours - TRL| "
                  "over all steps: " + "; ".join(f"{side} margin {d['margin']:.1e}, chosen logps "
                                                 f"{d['logps_chosen']:.1e}" for side, d in diffs.items())]
        if "packed_over_padded" in s:
            lines.append(f"- packing (ours-packed against ours-chunked, the same path padded): "
                         f"{s['packed_over_padded']:.2f}x tokens/s (paired median {s['packed_paired_median']:.2f}x); "
                         f"target >= 1.3x on HH lengths: **{'met' if s['packed_over_padded'] >= 1.3 else 'not met'}**")
        lines += [f"- memory: {next(iter(s['sides'].values())).get('method', 'not measured')}, a fresh process "
                  f"per side, {c['memory_steps']} steps; step peak = peak minus the state after setup"]
        lines += [f"- note: {n}" for n in run.get("notes", [])] + [""]
    return "\n".join(lines)


def write_report(path: str, run: dict) -> None:
    """Add (or replace, same configuration) this run in the .json beside the markdown; re-render the markdown."""
    md, js = Path(path), Path(path).with_suffix(".json")
    report = json.loads(js.read_text()) if js.exists() else {"runs": []}
    report["runs"] = [r for r in report["runs"] if r["key"] != run["key"]] + [run]
    md.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(render(report))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from unipipe_ray.data import collate_preference

    tokenizer = load_tokenizer_of(args.model)
    total = (args.memory_steps if args.probe else args.warmup + args.steps)
    features = load_features(args, tokenizer, total * args.pairs_per_step)
    if args.probe:
        print(json.dumps(memory_probe(args, tokenizer, features)))
        return
    B = args.pairs_per_step
    batches = [collate_preference(features[k * B:(k + 1) * B], tokenizer.pad_token_id) for k in range(total)]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    completion = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    positions = [b["input_ids"].numel() for b in batches]
    from unipipe_ray.core.packing import layout_of

    packed_positions = [layout_of(b["attention_mask"]).size for b in batches]
    info = machine(args)
    memory = measure_memory([a for a in argv if a != "--probe"]) if args.memory_steps else {}
    log = timing_run(args, tokenizer, features, total)
    info["load_avg_1m_end"] = os.getloadavg()[0]
    summary = summarize(args, log, tokens, completion, positions, memory)
    summary["packed_positions_per_step_median"] = statistics.median(packed_positions[args.warmup:])
    config = {k: v for k, v in vars(args).items() if k not in ("out", "probe", "note")}
    run = {"key": json.dumps({k: config[k] for k in ("model", "data", "pairs_per_step", "max_length", "device",
                                                     "dtype", "precompute_ref")}),
           "config": config, "machine": info, "command": "python " + " ".join(["bench/dpo_vs_trl.py", *argv]),
           "summary": summary, "notes": args.note, "log": log}
    print(render({"runs": [run]}))
    if args.out:
        write_report(args.out, run)


if __name__ == "__main__":
    main()
