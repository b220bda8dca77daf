"""The run's report: every stage's model on one held-out set, with intervals, and the training curves.

    <run_dir>/report.md       the table (eval.summary.markdown_table: 95% bootstrap intervals, differences to
                              the first policy with paired p-values, "n.s." where not significant) + plots
    <run_dir>/report.json     the same figures (without per-example scores)
    <run_dir>/plots/<stage>.png  the stage's TensorBoard scalars (losses, rewards, KL, accuracy) by step

Rows: answer accuracy by the task's checker (= the mean gold reward for 0/1 checkers), the reward model's
mean score of the answers, the DPO policy's implicit-reward accuracy and margin on held-out pairs, and the
KL to the SFT model (sampled responses, sum over tokens of log pi - log pi_sft; the k1 estimate).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unipipe_ray.config import PipelineConfig
from unipipe_ray.runtime.files import write_text_atomic
from unipipe_ray.runtime.logs import progress

CURVE_WORDS = ("loss", "reward", "accuracy", "margin", "kl", "gold", "proxy")


@torch.no_grad()
def kl_to_reference(policy: str, reference: str, prompts: list[list[int]], max_new_tokens: int, seed: int = 0):
    """Per-prompt sequence KL(policy || reference) estimates: one sampled response per prompt."""
    from unipipe_ray.core.models import load_tokenizer
    from unipipe_ray.ppo.roles import ReferenceModel
    from unipipe_ray.ppo.rollout import HFEngine

    samples = HFEngine(policy, seed=seed).generate(prompts, 1, max_new_tokens, temperature=1.0, seed=seed)
    ref = ReferenceModel(reference, load_tokenizer(reference).pad_token_id, temperature=1.0).logps(samples)
    return [sum(s.logps) - float(ref[i, :len(s.response_ids)].sum()) for i, s in enumerate(samples)]


def write_report(cfg: PipelineConfig, manifest) -> Path:
    from unipipe_ray.core.models import load_tokenizer, resolve_model
    from unipipe_ray.data import tokenize_prompt
    from unipipe_ray.data.held_out import pipeline_held_out
    from unipipe_ray.eval.evaluate import evaluate_model, preference_accuracy_of_rm
    from unipipe_ray.eval.summary import entry, without_scores
    from unipipe_ray.runtime.devices import inference_dtype

    run_dir = Path(cfg.run_dir).resolve()
    stages = manifest.data["stages"]
    done = {s: stages[s] for s in cfg.stages if stages.get(s, {}).get("status") == "done"}
    tokenizer = load_tokenizer(cfg.model)
    task, examples, pairs = pipeline_held_out(cfg)
    rm = done.get("rm", {}).get("checkpoint")
    models = {"base": str(resolve_model(cfg.model))} | {s: done[s]["checkpoint"] for s in ("sft", "ppo", "dpo")
                                                         if s in done}
    sft = models.get("sft")
    prompts = [tokenize_prompt(ex, tokenizer, 256)["input_ids"] for ex in examples]
    dtype = inference_dtype(cfg.eval_dtype)  # the report runs in the driver: its device decides "auto"
    results, extra = {}, {}
    for name, path in models.items():
        progress(f"report: evaluating {name} on {len(examples)} held-out examples")
        dpo_ref = (done["dpo"]["config"]["ref_model"] or done["dpo"]["config"]["model"]) if name == "dpo" else None
        result = evaluate_model(path, task, examples, pairs=pairs if name == "dpo" else None, reward_model=rm,
                                ref_model=str(resolve_model(dpo_ref)) if dpo_ref else None,
                                beta=cfg.dpo.beta, max_new_tokens=cfg.eval_max_new_tokens, dtype=dtype)
        # KL to SFT measures how far a stage trained from SFT moved; the base model is SFT's input, not its
        # output, and sampling its unstopped answers would cost as much as evaluating it.
        if sft and name not in ("sft", "base"):
            result["kl_to_sft"] = entry(kl_to_reference(path, sft, prompts, cfg.eval_max_new_tokens))
        results[name] = result
    if rm and pairs:  # the RM's accuracy on the held-out pairs: evaluate_model computed it with the DPO model's
        # pairs; it describes the RM, not that policy, so it leaves the policy's column (and is not scored twice)
        scored = results.get("dpo", {}).pop("rm_accuracy", None)
        extra["rm_accuracy"] = scored if scored is not None else preference_accuracy_of_rm(rm, pairs)
    plots = plot_curves(run_dir, list(done))
    text = _markdown(cfg, manifest, results, extra, plots, len(examples), len(pairs), dtype)
    write_text_atomic(run_dir / "report.md", text)
    write_text_atomic(run_dir / "report.json", json.dumps(
        {"models": models, "held_out_examples": len(examples), "held_out_pairs": len(pairs), "answer_dtype": dtype,
         "results": {k: without_scores(r) for k, r in results.items()},
         "rm": {k: without_scores({k: v})[k] for k, v in extra.items()}}, indent=2, default=float))
    progress(f"report: {run_dir / 'report.md'}")
    return run_dir / "report.md"


def _markdown(cfg, manifest, results, extra, plots, n_examples, n_pairs, dtype="float32") -> str:
    from unipipe_ray.eval.summary import markdown_table

    stages = manifest.data["stages"]
    lines = [f"# unipipe run: {' -> '.join(cfg.stages)}", "",
             f"Run directory `{Path(cfg.run_dir).resolve()}`; base model `{cfg.model}`; task "
             f"`{getattr(cfg, cfg.held_out_sections()[0]).data.task}`; held-out set: {n_examples} examples "
             f"({n_pairs} preference pairs), the {' and '.join(filter(None, cfg.held_out_sections()))} sections' "
             f"splits, never trained on. Answers are greedy, at most {cfg.eval_max_new_tokens} tokens, weights in "
             f"{dtype}.", "",
             "| stage | status | seconds | checkpoint |", "|---|---|---|---|"]
    for s in cfg.stages:
        e = stages.get(s, {})
        lines.append(f"| {s} | {e.get('status', 'not run')} | {e.get('seconds')} | `{e.get('checkpoint')}` |")
    gains = stage_gains(results)
    if gains:
        lines += ["", "## What each stage did (held-out exact match against the stage's input, paired)", "",
                  "| stage | input | input's | stage's | difference [95% interval] | p (McNemar) | verdict |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {g['stage']} | {g['input']} | {g['before']:.3f} | {g['after']:.3f} | {g['diff']:+.3f} "
                  f"[{g['low']:+.3f}, {g['high']:+.3f}] | {g['p_value']:.3g} | {g['verdict']} |" for g in gains]
        lines += ["", f"({n_examples} held-out problems: a difference counts only at p < 0.05; a stage that did "
                  "not help says so.)"]
    baseline = "sft" if "sft" in results else "base"
    lines += ["", f"## Every policy on the held-out set (differences to `{baseline}`, paired tests)", "",
              markdown_table(results, baseline=baseline), ""]
    if "rm_accuracy" in extra:
        e = extra["rm_accuracy"]
        lines += [f"Reward model: held-out preference accuracy {e['estimate']:.3f} "
                  f"[{e['low']:.3f}, {e['high']:.3f}] on {e['n']} pairs; mean margin {e.get('margin_mean', 0):.3f}.",
                  ""]
    lines += ["exact_match is the task checker's verdict (its mean is the mean gold reward); rm_score the reward "
              "model's mean score of the answers; implicit_accuracy the DPO policy's implicit reward against its "
              "reference on held-out pairs; kl_to_sft a sampled estimate of KL(policy || SFT) in nats.", "",
              "## Training curves", ""]
    lines += [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def stage_gains(results: dict[str, dict], metric: str = "exact_match", alpha: float = 0.05) -> list[dict]:
    """Each trained policy against its input on the held-out examples, paired. ``results`` holds the
    policies in chain order (base, then sft / ppo / dpo as run): each stage starts from the one before it.
    Verdict: "helped" / "hurt" when McNemar's p < alpha, else "no significant change"."""
    from unipipe_ray.eval.summary import compare_scores

    names = [n for n in results if metric in results[n] and "scores" in results[n][metric]]
    out = []
    for before, after in zip(names, names[1:], strict=False):
        a, b = results[before][metric], results[after][metric]
        c = compare_scores(a["scores"], b["scores"], alpha=alpha, binary=True)
        verdict = ("helped" if c["diff"] > 0 else "hurt") if c["significant"] else "no significant change"
        out.append({"stage": after, "input": before, "before": a["estimate"], "after": b["estimate"],
                    "diff": c["diff"], "low": c["low"], "high": c["high"], "p_value": c["p_value"],
                    "verdict": verdict})
    return out


def plot_curves(run_dir: Path, stages: list[str]) -> list[Path]:
    """One PNG per stage from its TensorBoard scalars whose names mention a loss, reward, accuracy, KL..."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    (run_dir / "plots").mkdir(exist_ok=True)
    for stage in stages:
        logs = run_dir / stage / "tensorboard"
        if not logs.is_dir():
            continue
        acc = EventAccumulator(str(logs))
        acc.Reload()
        tags = [t for t in acc.Tags()["scalars"] if any(w in t.split("/")[-1] for w in CURVE_WORDS)][:9]
        if not tags:
            continue
        cols = min(3, len(tags))
        rows = (len(tags) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, tag in zip(axes.flat, tags, strict=False):  # axes can outnumber tags
            events = acc.Scalars(tag)
            ax.plot([e.step for e in events], [e.value for e in events], marker="." if len(events) < 30 else None)
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("iteration" if stage == "ppo" else "step", fontsize=8)
        for ax in list(axes.flat)[len(tags):]:
            ax.axis("off")
        fig.tight_layout()
        path = run_dir / "plots" / f"{stage}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        out.append(path)
    return out
