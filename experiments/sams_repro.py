"""SamS reproduction, CPU-sized (issue 6 item 4): DPO, DPO random 50%, DPO + SamS 50%, SamS without f_S', each with
0% and 20% of the training labels flipped, several seeds; clean test labels.

    nice -n 19 python experiments/sams_repro.py                       # CPU default: tiny Llama, arith pairs
    python experiments/sams_repro.py --model smollm2-135m --task hh_harmless --train-size 1800 \\
        --test-size 500 --batch 16 --epochs 3 --lr 5e-6 --sft-epochs 1    # the GPU-machine version

Procedure (docs/sams.md): SFT on the chosen responses of the training pairs (clean labels), shared by every run;
during that SFT the SamS nets are pretrained on SFT-loss rewards (unipipe_ray.core.sams_pretrain); then per arm,
noise level and seed a DPO run from the SFT model (also the reference) with the DPO stage's own step
(experiments/sams_common.py), the same batches in the same order for every arm of a seed. The 50% arms see
every batch and step on half of it. Reported per arm and noise: mean and 95% t-interval over seeds of the
final test preference accuracy (implicit reward ranks the clean chosen answer first) and chosen reward,
median step time, step peak memory, and the share of flipped pairs among the pairs trained on.
Writes results/sams_repro.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from sams_common import (  # noqa: E402
    HH_PATH,
    DpoLearner,
    dpo_config,
    flip,
    load_model,
    peak_kb,
    reset_peak,
)

from unipipe_ray.core.forward import token_logps_of  # noqa: E402
from unipipe_ray.core.losses import sft_loss  # noqa: E402
from unipipe_ray.data import collate_preference, collate_sft  # noqa: E402
from unipipe_ray.runtime.devices import cpu_model  # noqa: E402
from unipipe_ray.stages.dpo_pairs import pair_logps  # noqa: E402

ARMS = ("none", "random", "sams", "sams_noexplore")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def load_data(args, tokenizer):
    from unipipe_ray.config import DataConfig
    from unipipe_ray.data.stage_data import load_stage_data

    hh = args.task == "hh_harmless"
    data = DataConfig(task=args.task, task_path=str(HH_PATH) if hh else None,
                      task_size=args.train_size + args.test_size, eval_size=args.test_size,
                      max_length=args.max_length, size=args.train_size, on_bad_record="skip")
    train, test, _ = load_stage_data(data, "preference", tokenizer)
    return train, test


def compact(train, test, pad_id, layers, hidden, seed=0):
    """A fresh small Llama over only the token ids the data uses, and the data re-indexed into it.

    The tiny Llama of `models.tiny_model_dir` keeps SmolLM2's 49,152-token vocabulary, whose LM head is most of
    its step on a CPU; arith pairs use a few hundred distinct tokens, so a model over those alone is the same
    task at a fraction of the cost. Returns (model, train, test, pad id)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = sorted({t for f in train + test for k in ("chosen_input_ids", "rejected_input_ids") for t in f[k]}
                 | {pad_id})
    index = {t: i for i, t in enumerate(ids)}

    def remap(f):
        return {k: [index[t] if t != -100 else t for t in v] if k.endswith(("input_ids", "labels")) else v
                for k, v in f.items()}

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(ids), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=hidden // 2, max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=index[pad_id])
    return LlamaForCausalLM(config), [remap(f) for f in train], [remap(f) for f in test], index[pad_id]


def sft(model, train, args, pad_id, settings_for_pretrain):
    """SFT on the chosen responses; SamS pretraining rides along (one no-grad forward per batch)."""
    from unipipe_ray.core.sams import SamsScheduler
    from unipipe_ray.core.sams_pretrain import SftPretrainer, sft_arm_inputs

    rows = [{"input_ids": f["chosen_input_ids"], "labels": f["chosen_labels"]} for f in train]
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    pretrainer = SftPretrainer(SamsScheduler(model.config.hidden_size, model.config.num_hidden_layers,
                                             settings_for_pretrain, seed=0))
    g, losses, chunk = torch.Generator().manual_seed(0), [], args.chunk or None
    for _ in range(args.sft_epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        for i in range(0, len(order) - args.batch + 1, args.batch):
            batch = collate_sft([rows[j] for j in order[i:i + args.batch]], pad_id)
            pretrainer.step(*sft_arm_inputs(model, batch, chunk))
            loss = sft_loss(*token_logps_of(model, model, batch, chunk))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return pretrainer.sched.state_dict()["nets"], losses


@torch.no_grad()
def logps_of(model, feats, pad_id, chunk, batch_size=32):
    model.eval()
    out = [pair_logps(model, collate_preference(feats[i:i + batch_size], pad_id), chunk_size=chunk)
           for i in range(0, len(feats), batch_size)]
    model.train()
    return torch.cat([c for c, _ in out]), torch.cat([r for _, r in out])


def test_metrics(policy, ref_logps, test, pad_id, beta, chunk):
    chosen, rejected = logps_of(policy, test, pad_id, chunk)
    r_chosen, r_rejected = beta * (chosen - ref_logps[0]), beta * (rejected - ref_logps[1])
    return {"accuracy": (r_chosen > r_rejected).float().mean().item(), "rewards_chosen": r_chosen.mean().item(),
            "rewards_margin": (r_chosen - r_rejected).mean().item()}


def dpo_run(arm, noise, seed, sft_model, pretrained, train, test, ref_logps, args, pad_id, sams):
    chunk = args.chunk or None
    cfg = dpo_config(arm, args.keep_ratio, args.beta, chunk, sams)
    policy = copy.deepcopy(sft_model).requires_grad_(True)  # the shared SFT model is the frozen reference
    learner = DpoLearner(policy, sft_model, cfg, pad_id, lr=args.lr, seed=seed)
    if learner.selector.sched is not None and args.pretrained:
        nets = {k: v for k, v in pretrained.items() if cfg.sams.explore or not k.startswith("explore.")}
        learner.selector.sched.load_nets(nets)
    noisy, flipped = flip(train, noise, seed=1000 + seed)
    g = torch.Generator().manual_seed(seed)  # batch order: the same for every arm of a seed
    times, trained, trained_flipped, curve = [], 0, 0, []
    rss = reset_peak()
    for _ in range(args.epochs):
        order = torch.randperm(len(noisy), generator=g).tolist()
        for i in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[i:i + args.batch]
            out = learner.step([noisy[j] for j in idx], [("train", j) for j in idx])
            times.append(out["time_s"])
            kept = [idx[j] for j in out["kept_indices"]]
            trained, trained_flipped = trained + len(kept), trained_flipped + sum(j in flipped for j in kept)
        curve.append(test_metrics(policy, ref_logps, test, pad_id, args.beta, chunk))
    peak = (peak_kb() - rss) / 1024
    return {"arm": arm, "noise": noise, "seed": seed, **curve[-1], "curve": curve,
            "step_s_median": statistics.median(times), "step_peak_above_rss_mb": peak,
            "trained_pairs": trained, "trained_flipped_share": trained_flipped / max(trained, 1),
            "steps": len(times)}


def interval(values):
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5


def report(result, args) -> str:
    runs = result["runs"]
    lines = ["# SamS reproduction, CPU version", "",
             f"Machine: {result['cpu']}, {os.cpu_count()} cores, no GPU; torch threads {args.threads}; under "
             f"`nice -n 19` beside another job (times are noisy). Wall time {result['wall_s'] / 60:.1f} min.",
             f"Command: `nice -n 19 python experiments/sams_repro.py {' '.join(result['argv'])}`", "",
             f"Setting: {result['setting']}", "",
             f"SFT: {len(result['sft_losses'])} steps, loss {result['sft_losses'][0]:.3f} -> "
             f"{statistics.fmean(result['sft_losses'][-10:]):.3f} (mean of the last 10).", "",
             "Mean over seeds ± 95% t-interval half-width (n = seeds). Accuracy: final test preference accuracy "
             "on clean labels; chosen reward: mean beta * (log pi - log pi_ref) of the test chosen answers; "
             "flipped share: flipped pairs among the pairs each arm trained on (20% for any arm that ignores them). "
             "Step s: median step time (mean over seeds). Step peak: resident-set high-water mark above the "
             "resident set before the run; all runs share one process, so after the first run freed memory is "
             "reused and these figures are not comparable between arms: results/sams_cost.md measures memory "
             "with a fresh process per arm.",
             "Accuracy - DPO: the difference to plain DPO of the same seed (same batches, same flipped pairs).",
             "", "| noise | arm | test accuracy | accuracy - DPO | chosen reward | margin | flipped share trained | "
             "step s | step peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    for noise in args.noise:
        for arm in args.arms:
            rs = [r for r in runs if r["arm"] == arm and r["noise"] == noise]
            if not rs:
                continue
            dpo = {r["seed"]: r["accuracy"] for r in runs if r["arm"] == "none" and r["noise"] == noise}
            diff = interval([r["accuracy"] - dpo[r["seed"]] for r in rs if r["seed"] in dpo] or [float("nan")])
            cells = [interval([r[k] for r in rs]) for k in ("accuracy", "rewards_chosen", "rewards_margin")]
            cells.insert(1, diff)
            flipped = statistics.fmean(r["trained_flipped_share"] for r in rs)
            lines.append(f"| {noise:.0%} | {arm} | " + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in cells)
                         + f" | {flipped:.3f} | {statistics.fmean(r['step_s_median'] for r in rs):.3f} | "
                         f"{statistics.fmean(r['step_peak_above_rss_mb'] for r in rs):.0f} |")
    lines += ["", "Test accuracy after each epoch (mean over seeds):", "",
              "| noise | arm | " + " | ".join(f"ep {e + 1}" for e in range(args.epochs)) + " |",
              "|---|---|" + "---|" * args.epochs]
    for noise in args.noise:
        for arm in args.arms:
            rs = [r for r in runs if r["arm"] == arm and r["noise"] == noise]
            if rs:
                means = [statistics.fmean(r["curve"][e]["accuracy"] for r in rs) for e in range(len(rs[0]["curve"]))]
                lines.append(f"| {noise:.0%} | {arm} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="compact", help="compact (a fresh Llama over the data's tokens) or a spec")
    p.add_argument("--layers", type=int, default=4, help="compact model: blocks")
    p.add_argument("--hidden", type=int, default=64, help="compact model: width")
    p.add_argument("--task", default="arith", choices=["arith", "hh_harmless"])
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--sft-epochs", type=int, default=4)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--chunk", type=int, default=1024, help="LM-head chunk size (0: full logits)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--sams", default="{}", help="SamsSettings overrides as JSON")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="skip SFT-time pretraining")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results/sams_repro"))
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = p.parse_args()
    if args.report_only:
        result = json.loads(Path(args.out + ".json").read_text())
        Path(args.out + ".md").write_text(report(result, args))
        return
    from transformers import AutoTokenizer

    from unipipe_ray.core.models import resolve_model
    from unipipe_ray.core.sams import SamsSettings

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start, sams = time.time(), json.loads(args.sams)
    path = resolve_model("tiny" if args.model == "compact" else args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, test = load_data(args, tokenizer)
    pad_id = tokenizer.pad_token_id
    if args.model == "compact":
        model, train, test, pad_id = compact(train, test, pad_id, args.layers, args.hidden)
    else:
        model = load_model(path)
    nets, sft_losses = sft(model, train, args, pad_id, SamsSettings(**sams))
    print(f"sft: {len(sft_losses)} steps, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} "
          f"({time.time() - start:.0f} s)", flush=True)
    ref_logps = logps_of(model, test, pad_id, args.chunk or None)
    runs = []
    for seed in args.seeds:
        for noise in args.noise:
            for arm in args.arms:
                runs.append(dpo_run(arm, noise, seed, model, nets, train, test, ref_logps, args, pad_id, sams))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
    name = f"compact ({args.layers} blocks x {args.hidden}, vocab {model.config.vocab_size})" \
        if args.model == "compact" else args.model
    setting = (f"model {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), task "
               f"{args.task}: {len(train)} train / {len(test)} test pairs, <= {args.max_length} tokens; SFT "
               f"{args.sft_epochs} epochs lr {args.sft_lr}; DPO beta {args.beta}, lr {args.lr} (AdamW), batch "
               f"{args.batch} pairs, {args.epochs} epochs, keep ratio {args.keep_ratio}; SamS settings "
               f"{sams or 'default'}, nets {'pretrained during SFT' if args.pretrained else 'fresh'}; seeds "
               f"{args.seeds}")
    result = {"argv": sys.argv[1:], "cpu": cpu_model(), "setting": setting, "sft_losses": sft_losses,
              "runs": runs, "wall_s": time.time() - start}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    Path(args.out + ".md").write_text(report(result, args))
    print(report(result, args))


if __name__ == "__main__":
    main()
