"""Base model of the CPU allocation reproduction (docs/allocation.md): a small Llama (1.2M parameters by default)
pretrained from scratch on arith word problems answered in PROSE, so that it can do the arithmetic but has never
seen the task's "Step k: a op b = c ... #### n" answer format (the cold start of finding iii needs such a model).

    nice -n 19 python experiments/allocation_base.py [OUT_DIR] [--minutes 10] [--threads 1] [--hidden 128 --layers 6]

OUT_DIR defaults to <models.cache_dir()>/allocation_base; if it exists only the checks run. Steps:
  1. text: chat-templated arith prompts (generated with another seed than the sweep's pool, questions of that
     pool removed) followed by a prose answer (`prose_solution`), e.g. "Ada starts with 3 apples. Finding 5
     more makes 3 + 5 = 8. So Ada has 8 apples now." Never "Step" and never "####".
  2. tokenizer: SmolLM2's (what the `tiny` spec uses), trimmed to the tokens this text and the task's step
     solutions use (`trim_tokenizer`): every task text encodes to the same token strings, but the LM head has
     ~440 rows instead of 49,152, which on a CPU makes a step ~7x cheaper (measured: 4 blocks x 128, 1,600
     tokens per step, 1 thread: 1.28 s with the full vocabulary, 0.17 s trimmed).
  3. pretraining: next-token loss on the answer tokens (the prompt is context), AdamW, warmup + cosine, the
     step count calibrated to --minutes of CPU time; then the rows of tokens it never read get distinct
     embeddings (`spread_unseen`); saved as a HF checkpoint dir (safetensors, tokenizer, chat template) that
     every `model:` key of the project takes.
  4. checks (results/allocation_repro_base.{md,json}): greedy answers of the base model on held-out questions
     of the sweep's pool: share with "####" (should be ~0) and prose accuracy (last number = answer); then the
     project's SFT stage on 64 step-format examples (2 epochs, the sweep's lr) and the same figures after it:
     the format should appear after a little SFT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from unipipe_ray.data.arith import ArithProblem, ArithTask
from unipipe_ray.data.records import SFTExample
from unipipe_ray.runtime.devices import cpu_model

ROOT = Path(__file__).resolve().parents[1]
POOL_SEED = 0          # the sweep's task pool: ArithTask(n=task_size, seed=data.seed=0)
EXCLUDE_POOL = 20_000  # pretraining skips every question of the first 20k pool problems (any task_size below)
PRETRAIN_SEED = 7919   # another seed: the pretraining questions are not the pool's
_CLAUSES = {  # op -> (clause with the equation, clause without it)
    "+": ("finding {b} more makes {a} + {b} = {c}", "finds {b} more: {c}"),
    "-": ("giving away {b} leaves {a} - {b} = {c}", "gives away {b}: {c}"),
    "*": ("having {b} times as many makes {a} * {b} = {c}", "gets {b} times as many: {c}"),
}
_THEN = ("First", "Then", "Next", "After that")


def name_and_item(problem: ArithProblem) -> tuple[str, str]:
    """"Ada has 3 apples. ..." -> ("Ada", "apples")."""
    words = problem.question.split()
    return words[0], words[3].rstrip(".")


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def prose_solution(problem: ArithProblem, variant: int) -> str:
    """A prose answer in one of three styles (variant % 3): sentences with the equations, one equation per line,
    or sentences with the results only. Every intermediate result is stated and the final answer is the text's
    last number. Never "Step" lines, never "####": the task's format is left for SFT to teach."""
    name, item = name_and_item(problem)
    rows, value = [], problem.start
    for op, b in problem.steps:
        result = {"+": value + b, "-": value - b, "*": value * b}[op]
        rows.append((op, value, b, result))
        value = result
    style = variant % 3
    if style == 0:
        body = " ".join(_upper_first(_CLAUSES[op][0].format(a=a, b=b, c=c)) + "." for op, a, b, c in rows)
        return f"{name} starts with {problem.start} {item}. {body} So {name} has {value} {item} now."
    if style == 1:
        body = "\n".join(f"{_THEN[min(k, 3)]}, {a} {op} {b} = {c}." for k, (op, a, b, c) in enumerate(rows))
        return f"{body}\n{name} has {value} {item}."
    body = ", then ".join(_CLAUSES[op][1].format(b=b, c=c) for op, _, b, c in rows)
    return f"{name} has {problem.start} {item} and {body}. So {name} has {value} {item}."


def pretraining_examples(n: int, seed: int = PRETRAIN_SEED, exclude: set[str] | None = None) -> list[SFTExample]:
    """n prose-answered problems from ArithTask(seed); questions in `exclude` are skipped (more are drawn)."""
    exclude = exclude or set()
    out, draw = [], n + n // 20 + 10  # a few spare draws for the skipped questions
    while len(out) < n:
        task = ArithTask(n=draw, seed=seed)
        out = [p for p in task.problems if p.question not in exclude][:n]
        draw = draw * 2
    rng = random.Random(seed)
    return [SFTExample(({"role": "user", "content": p.question},), prose_solution(p, rng.randrange(3)),
                       f"allocation_base(seed={seed})[{i}]", {"answer": str(p.answer)}) for i, p in enumerate(out)]


def trim_tokenizer(tokenizer, texts: list[str]):
    """The tokenizer with only the BPE tokens (and their merge ancestors) that `texts` use, plus the 256 byte
    symbols and the special tokens; ids renumbered in the original order. Every text encodes to the same token
    strings as before: a kept merge list is a priority-ordered subset that holds every merge those texts apply."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], [m if isinstance(m, list) else m.split(" ", 1)
                                             for m in spec["model"]["merges"]]
    parents: dict[str, list] = {}
    for a, b in merges:
        parents.setdefault(a + b, []).append((a, b))
    keep = set(pre_tokenizers.ByteLevel.alphabet()) | {t["content"] for t in spec["added_tokens"]}
    todo = [t for text in texts for t in tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).tokens]
    while todo:
        token = todo.pop()
        if token not in keep:
            keep.add(token)
            todo.extend(p for pair in parents.get(token, ()) for p in pair)
    new_vocab = {t: i for i, t in enumerate(sorted((t for t in keep if t in vocab), key=vocab.get))}
    spec["model"]["vocab"] = new_vocab
    spec["model"]["merges"] = [[a, b] for a, b in merges if a in new_vocab and b in new_vocab and a + b in new_vocab]
    spec["added_tokens"] = [{**t, "id": new_vocab[t["content"]]} for t in spec["added_tokens"]]
    trimmed = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                      pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token)
    trimmed.chat_template = tokenizer.chat_template
    return trimmed


def task_texts(tokenizer, examples: list[SFTExample], pool: ArithTask) -> list[str]:
    """Everything the model will read or write: chat prompts, prose answers, step solutions (right and slipped)."""
    prompts = [ex.prompt for ex in examples] + [({"role": "user", "content": p.question},) for p in pool.problems]
    texts = [tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in prompts]
    texts += [ex.response for ex in examples] + [pair.rejected for pair in pool.preference_pairs(seed=0)]
    return texts + [p.solution() for p in pool.problems]


def build_model(vocab_size: int, tokenizer, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=1,
                         head_dim=64, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def pretrain(model, examples: list[SFTExample], tokenizer, args) -> tuple[dict, set[int]]:
    """Next-token loss on the answer tokens, one pass over fresh examples; the step count is fixed after
    timing the first 20 steps so that the run fills --minutes of CPU time (unless --steps is given).
    Returns the run's figures and the token ids it read."""
    from unipipe_ray.data import collate_sft, tokenize_sft

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    total, warmup, losses, tokens, seen = args.steps or 10**9, args.warmup, [], 0, set()
    start = time.time()
    cpu_start = t1 = time.process_time()
    for step in range(len(examples) // args.batch):
        if step >= total:
            break
        if step == 20 and not args.steps:  # calibrate on steps 1-19 (step 0 pays one-off costs)
            per_step = (time.process_time() - t1) / 19  # CPU time: other jobs on the machine do not count
            total = max(warmup + 20, int(args.minutes * 60 / per_step))
            print(f"pretrain: {per_step:.3f} CPU s/step -> {total} steps", flush=True)
        if step == 1:
            t1 = time.process_time()
        part = examples[step * args.batch:(step + 1) * args.batch]
        rows = [tokenize_sft(ex, tokenizer, args.max_length) for ex in part]
        seen.update(t for row in rows for t in row["input_ids"])
        batch = collate_sft(rows, tokenizer.pad_token_id)
        tokens += int(batch["attention_mask"].sum())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr, warmup)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"pretrain step {step}/{total}: loss {sum(losses[-100:]) / len(losses[-100:]):.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    return {"steps": len(losses), "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "tokens": tokens, "tokens_per_cpu_s": round(tokens / cpu_seconds), "loss_first": losses[0],
            "loss_last100": sum(losses[-100:]) / len(losses[-100:])}, seen


@torch.no_grad()
def spread_unseen(model, seen: set[int], seed: int) -> int:
    """Give the tokens the pretraining never read ("Step", "####", ":", ...) distinct embeddings.

    With tied embeddings the softmax pushed every unseen row along the same direction, so they end up nearly
    parallel, and SFT would raise "Step" and "####" together (measured: SFT wrote "#### 1: ..."). Adding noise
    with the covariance of the trained rows keeps them unlikely (each keeps its pushed-down mean) but tells them
    apart. Returns how many rows were changed."""
    emb = model.get_input_embeddings().weight
    unseen = torch.tensor([i for i in range(emb.shape[0]) if i not in seen], dtype=torch.long)
    trained = emb[torch.tensor(sorted(seen))]
    cov = torch.cov(trained.T) + 1e-5 * torch.eye(emb.shape[1])
    torch.manual_seed(seed)
    noise = torch.distributions.MultivariateNormal(torch.zeros(emb.shape[1]), covariance_matrix=cov)
    emb[unseen] += noise.sample((len(unseen),))
    return len(unseen)


def last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d+", text)
    return numbers[-1] if numbers else None


def answer_figures(model_dir: str, examples, max_new_tokens: int) -> dict:
    """Greedy answers (the project's eval generation) -> format rate ("####" present), the checker's accuracy,
    and prose accuracy (the last number equals the answer), with a few samples."""
    from unipipe_ray.data.answers import answer_reward
    from unipipe_ray.eval.evaluate import generate_completions

    completions = generate_completions(model_dir, examples, max_new_tokens, progress=False)
    n, pairs = len(examples), list(zip(examples, completions, strict=True))
    return {"n": n, "format_rate": sum("####" in c for c in completions) / n,
            "step_rate": sum("Step 1:" in c for c in completions) / n,
            "accuracy": sum(answer_reward(ex, c) for ex, c in pairs) / n,
            "prose_accuracy": sum(last_number(c) == ex.meta["answer"] for ex, c in pairs) / n,
            "samples": [{"question": ex.prompt[-1]["content"], "answer": ex.meta["answer"], "completion": c}
                        for ex, c in pairs[:4]]}


def sft_check(model_dir: str, n: int, args) -> tuple[str, dict]:
    """The project's SFT stage (Ray Train, one worker) on n step-format examples of the pool."""
    from unipipe_ray.config import DataConfig, SFTConfig, TrainConfig
    from unipipe_ray.stages.sft import run_sft

    cfg = SFTConfig(model=model_dir, output_dir=str(Path(args.work) / f"sft_check_{n}"),
                    data=DataConfig(task="arith", task_size=args.pool_size, eval_size=args.eval_size,
                                    size=n, max_length=args.max_length),
                    train=TrainConfig(batch_size=16, epochs=2, lr=args.sft_lr, warmup_ratio=0.1,
                                      cpus_per_worker=0.9, log_every=2))
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a rebuilt base must not resume the old run
    out = run_sft(cfg)
    return out["checkpoint"], {"examples": out["train_examples"], "lr": args.sft_lr, "epochs": 2, "batch": 16,
                               "seconds": out["seconds"], "sft/loss": (out["metrics"] or {}).get("sft/loss")}


def held_out(args) -> list:
    """The first --check-size held-out questions of the sweep's pool (the sft section's eval split)."""
    from unipipe_ray.config import DataConfig
    from unipipe_ray.data.stage_data import stage_examples

    data = DataConfig(task="arith", task_size=args.pool_size, eval_size=args.eval_size, max_length=args.max_length)
    return stage_examples(data, "sft")[1][:args.check_size]


def build_base(out: Path, args) -> dict:
    """Trimmed tokenizer + pretrained model, written to a temp sibling and renamed into `out`."""
    from unipipe_ray.core.models import DEFAULT_MODEL, load_tokenizer

    smollm2 = load_tokenizer(DEFAULT_MODEL)
    pool = ArithTask(n=EXCLUDE_POOL, seed=POOL_SEED)
    examples = pretraining_examples(args.max_examples, exclude={p.question for p in pool.problems})
    tokenizer = trim_tokenizer(smollm2, task_texts(smollm2, examples[:5000], ArithTask(n=5000, seed=POOL_SEED)))
    for text in task_texts(smollm2, examples[-300:], ArithTask(n=300, seed=POOL_SEED + 1)):  # unseen texts
        if tokenizer.tokenize(text) != smollm2.tokenize(text):
            raise RuntimeError(f"the trimmed tokenizer splits {text!r} differently from SmolLM2's")
    model = build_model(len(tokenizer), tokenizer, args.hidden, args.layers, args.seed)
    stats, seen = pretrain(model, examples, tokenizer, args)
    unseen = spread_unseen(model, seen, args.seed)
    info = {"vocab_size": len(tokenizer), "hidden": args.hidden, "layers": args.layers,
            "params": sum(p.numel() for p in model.parameters()), "pretrain": stats, "unseen_tokens": unseen,
            "pretrain_seed": PRETRAIN_SEED,
            "excluded_pool": f"ArithTask(n={EXCLUDE_POOL}, seed={POOL_SEED}) questions",
            "lr": args.lr, "batch": args.batch, "threads": args.threads}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "allocation_base.json").write_text(json.dumps(info, indent=1))
    tmp.rename(out)
    return info


def report(result: dict) -> str:
    info, base, sfts = result["base"], result["checks"]["base"], result["sft"]
    pre = info["pretrain"]
    lines = ["# Allocation reproduction: the CPU base model", "",
             f"Built by `{result['command']}` on {result['machine']}; checkpoint `{result['model_dir']}`.", "",
             f"Llama, {info['layers']} blocks x {info['hidden']} (head dim 64, 1 KV head, SwiGLU 3x), vocabulary "
             f"{info['vocab_size']} (SmolLM2's tokenizer trimmed to the task's tokens), {info['params'] / 1e6:.2f}M "
             f"parameters. Pretrained from scratch on arith questions ({info['excluded_pool']} removed) answered in "
             f"prose, loss on the answer tokens: {pre['steps']} steps of {info['batch']}, peak lr {info['lr']}, "
             f"{pre['tokens'] / 1e6:.2f}M tokens (padded batches) in {pre['cpu_seconds'] / 60:.1f} CPU min, "
             f"{pre['seconds'] / 60:.1f} min wall time on the shared machine ({pre['tokens_per_cpu_s']} tokens per "
             f"CPU s, {info['threads']} thread(s)); loss {pre['loss_first']:.2f} -> {pre['loss_last100']:.3f} "
             "(last 100 steps).", "",
             f"Greedy answers on {base['n']} held-out questions of the sweep's pool (format: the answer has \"####\"; "
             "accuracy: the task checker; prose accuracy: the last number is the answer):", "",
             "| model | format rate | \"Step 1:\" rate | checker accuracy | prose accuracy |", "|---|---|---|---|---|"]
    rows = [("base", base)] + [(f"base + SFT on {s['examples']} step-format examples", s["figures"]) for s in sfts]
    for name, f in rows:
        lines.append(f"| {name} | {f['format_rate']:.3f} | {f['step_rate']:.3f} | {f['accuracy']:.3f} | "
                     f"{f['prose_accuracy']:.3f} |")
    s = sfts[0]
    lines += ["", f"SFT: the project's SFT stage (Ray Train, 1 worker), {s['epochs']} epochs, batch {s['batch']}, "
              f"lr {s['lr']} (the sweep's), warmup 0.1 + cosine; " + ", ".join(
                  f"{x['examples']} examples {x['seconds']:.0f} s" for x in sfts) + ".", ""]
    for name, f in rows:
        lines += [f"Samples ({name}):", ""]
        lines += [f"- {x['question']} (answer {x['answer']}) -> `{x['completion']!r}`" for x in f["samples"][:3]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from unipipe_ray.core.models import cache_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=str(cache_dir() / "allocation_base"), help="checkpoint directory")
    p.add_argument("--hidden", type=int, default=128, help="width (a multiple of the head dim 64)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining CPU time (calibrated step count)")
    p.add_argument("--steps", type=int, default=0, help="fixed step count instead of --minutes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--max-examples", type=int, default=120_000, help="pretraining problems generated")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pool-size", type=int, default=2000, help="the sweep's data.task_size")
    p.add_argument("--eval-size", type=int, default=128, help="the sweep's data.eval_size")
    p.add_argument("--check-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--sft-examples", type=int, nargs="+", default=[64, 256], help="SFT check sizes")
    p.add_argument("--sft-lr", type=float, default=1.5e-3, help="the sweep's SFT lr")
    p.add_argument("--work", default=str(ROOT / "runs/allocation_base"), help="SFT check output")
    p.add_argument("--results", default=str(ROOT / "results/allocation_repro_base"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser().resolve()
    if (out / "config.json").exists():
        info = json.loads((out / "allocation_base.json").read_text())
        print(f"{out} exists: checks only", flush=True)
    else:
        info = build_base(out, args)
    examples = held_out(args)
    checks = {"base": answer_figures(str(out), examples, args.max_new_tokens)}
    print(json.dumps({k: v for k, v in checks["base"].items() if k != "samples"}), flush=True)
    sfts = []
    for n in args.sft_examples:
        sft_dir, sft = sft_check(str(out), n, args)
        sfts.append({**sft, "figures": answer_figures(sft_dir, examples, args.max_new_tokens)})
        print(json.dumps({k: v for k, v in sfts[-1]["figures"].items() if k != "samples"}), flush=True)
    result = {"command": "nice -n 19 python experiments/allocation_base.py " + " ".join(sys.argv[1:]),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores (shared with other jobs), no GPU",
              "model_dir": str(out),
              "base": info, "sft": sfts, "checks": checks}
    Path(args.results + ".json").write_text(json.dumps(result, indent=1))
    Path(args.results + ".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
