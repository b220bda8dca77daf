"""Active vs random choice of preference pairs to label: reward-model accuracy on HH-RLHF harmless.

Question: with a budget of k labels, does labelling the pairs a small reward-model ensemble disagrees on
most (what `unipipe select --method ensemble` does) give a more accurate reward model than k random pairs?

The reward model is SmolLM2-135M-Instruct with its backbone frozen and the RM stage's scalar head on the
last real token (core/reward_head.py `rewards`), trained with the Bradley-Terry loss (losses.py) plus an L2
penalty. Freezing the backbone is what makes this fit a 2-core CPU: the pooled hidden states of every
pair are computed once (cached), after which each of the hundreds of heads trains in milliseconds.

Per seed: a seed set of `--seed-size` random pool pairs is labelled. Each arm then labels k more pool pairs
in `--rounds` equal rounds, retraining between rounds, and a final head on seed set + k pairs is scored on
the fixed test pairs:
    random     k pairs uniformly from the unlabelled pool
    ensemble   `--ensemble` heads, each on a bootstrap resample of the labelled pairs; the pairs with the
               largest std of (scaled) margins (eval/select.py ensemble_disagreement)
    margin     one head; the pairs with the smallest |margin| (eval/select.py margin_uncertainty)
The seed set, pool and test set are shared by the arms of a seed, so arms compare paired over seeds.

    python experiments/active_learning.py --data ../shared/data/hh-rlhf-harmless/test.jsonl.gz
    python experiments/active_learning.py --data FILE --model tiny --pool 40 --test 30 --seed-size 8 \
        --ks 8 --seeds 2 --out /tmp/al       # smoke mode: seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unipipe_ray.core.losses import bradley_terry_loss
from unipipe_ray.core.models import cache_dir, load_tokenizer, resolve_model
from unipipe_ray.data import collate_preference, load_examples, tokenize_all
from unipipe_ray.eval.select import ensemble_disagreement, margin_uncertainty, top_k
from unipipe_ray.eval.summary import compare_scores, entry
from unipipe_ray.runtime.devices import cpu_model

ARMS = ("random", "ensemble", "margin")


def split_pairs(path: str, pool: int, test: int, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Tokenized pairs, shuffled once (seed 0): the first `test` usable ones are the test set, the next
    `pool` the unlabelled pool. Records the loaders reject (empty turns, identical after truncation) are
    skipped and counted."""
    pairs, report = load_examples("preference", [(path, 1.0)], on_bad_record="skip")
    random.Random(0).shuffle(pairs)
    feats = tokenize_all(pairs[:int(1.2 * (pool + test)) + 10], "preference", tokenizer, max_length, "skip",
                         report, max_prompt_length=max_prompt_length)
    if len(feats) < pool + test:
        raise SystemExit(f"{path}: only {len(feats)} usable pairs for pool {pool} + test {test}")
    return {"test": feats[:test], "pool": feats[test:test + pool], "load_report": report.summary()}


@torch.no_grad()
def pooled_features(model_spec: str, feats: list[dict], pad_id: int, batch_size: int = 16) -> np.ndarray:
    """(N, 2, H): the frozen backbone's final hidden state at the last real token of each pair's chosen
    (0) and rejected (1) sequence: what the RM head sees (core.reward_head.rewards with the head left out)."""
    from transformers import AutoModel

    from unipipe_ray.core.reward_head import rewards

    backbone = AutoModel.from_pretrained(resolve_model(model_spec), dtype=torch.float32).eval()
    no_head = type("NoHead", (), {"score": torch.nn.Identity()})  # rewards() applies module.score last
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["chosen_input_ids"]))  # less padding
    out = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        pooled = rewards(backbone, no_head, collate_preference([feats[i] for i in idx], pad_id))  # (2B, H)
        out = np.zeros((len(feats), 2, pooled.shape[-1]), np.float32) if out is None else out
        out[idx, 0], out[idx, 1] = pooled[:len(idx)].numpy(), pooled[len(idx):].numpy()
        print(f"\rfeatures {min(start + batch_size, len(order))}/{len(order)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return out


def train_head(x: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Linear reward head w (H,) on pair features x (N, 2, H): mean Bradley-Terry loss of (x_c w, x_r w)
    + weight_decay / 2 * |w|^2, minimised by L-BFGS from zero (convex: one optimum, no seed needed)."""
    w = torch.zeros(x.shape[-1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        rewards = x @ w
        loss = bradley_terry_loss(rewards[:, 0], rewards[:, 1])[0].mean() + weight_decay / 2 * w.dot(w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def pair_margins(w: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """(N,) margins r(chosen) - r(rejected) of a head on pair features (N, 2, H)."""
    rewards = x @ w
    return (rewards[:, 0] - rewards[:, 1]).numpy()


def choose(arm: str, labelled: list[int], unlabelled: list[int], n: int, pool: torch.Tensor, args,
           rng: np.random.Generator) -> list[int]:
    """n pool indices from `unlabelled` for this arm, given the labelled ones so far."""
    if arm == "random":
        return rng.choice(unlabelled, size=n, replace=False).tolist()
    x_new = pool[unlabelled]
    if arm == "margin":
        scores = margin_uncertainty(pair_margins(train_head(pool[labelled], args.weight_decay), x_new))
    else:  # bagging: each member sees a bootstrap resample of the labelled pairs
        heads = [train_head(pool[rng.choice(labelled, size=len(labelled))], args.weight_decay)
                 for _ in range(args.ensemble)]
        scores = ensemble_disagreement(np.stack([pair_margins(w, x_new) for w in heads]))
    return [unlabelled[i] for i in top_k(scores, n)]


def accuracy(w: torch.Tensor, test: torch.Tensor) -> float:
    """Share of test pairs scored chosen > rejected (ties 0.5)."""
    m = pair_margins(w, test)
    return float(np.mean((m > 0) + 0.5 * (m == 0)))


def run_seed(seed: int, pool: torch.Tensor, test: torch.Tensor, args) -> dict:
    """{arm: {k: test accuracy}} plus the seed-set-only and whole-pool references for one seed."""
    rng = np.random.default_rng(seed)
    seed_set = rng.choice(len(pool), size=args.seed_size, replace=False).tolist()
    out = {"seed_only": accuracy(train_head(pool[seed_set], args.weight_decay), test)}
    for arm in ARMS:
        out[arm] = {}
        for k in args.ks:
            arm_rng = np.random.default_rng([seed, k, ARMS.index(arm)])
            labelled = list(seed_set)
            for r in range(args.rounds):
                n = k // args.rounds + (r < k % args.rounds)
                unlabelled = sorted(set(range(len(pool))) - set(labelled))
                labelled += choose(arm, labelled, unlabelled, n, pool, args, arm_rng)
            out[arm][k] = accuracy(train_head(pool[labelled], args.weight_decay), test)
    return out


def features(args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(pool (P, 2, H), test (T, 2, H)) float64, standardised with the pool's mean and std (no labels
    used), cached by settings; and facts about the data."""
    key = json.dumps([resolve_model(args.model), str(Path(args.data).resolve()), args.pool, args.test,
                      args.max_length, args.max_prompt_length])
    path = Path(args.cache) / f"al-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    tokenizer = load_tokenizer(args.model)
    if path.exists():
        data = dict(np.load(path, allow_pickle=False))
        info = json.loads(str(data["info"]))
    else:
        split = split_pairs(args.data, args.pool, args.test, tokenizer, args.max_length, args.max_prompt_length)
        start = time.time()
        both = pooled_features(args.model, split["test"] + split["pool"], tokenizer.pad_token_id)
        tokens = sum(len(f[f"{s}_input_ids"]) for f in split["test"] + split["pool"] for s in ("chosen", "rejected"))
        info = {"load_report": split["load_report"], "feature_seconds": round(time.time() - start, 1),
                "tokens": tokens}
        data = {"test": both[:args.test], "pool": both[args.test:], "info": json.dumps(info)}
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **data)
    pool, test = (torch.from_numpy(data[name].astype(np.float64)) for name in ("pool", "test"))
    mean, std = pool.reshape(-1, pool.shape[-1]).mean(0), pool.reshape(-1, pool.shape[-1]).std(0).clamp(min=1e-6)
    return (pool - mean) / std, (test - mean) / std, info | {"cache": str(path)}


def tune_weight_decay(pool: torch.Tensor, args, grid=(0.01, 0.1, 1.0, 10.0, 100.0)) -> dict:
    """Pick the L2 penalty on the pool alone (the test set stays untouched): train on random pairs of one
    half of the pool (the smallest and largest labelled-set sizes of the experiment), score on the other
    half; mean over 5 draws. {weight_decay: {n: dev accuracy}}."""
    rng = np.random.default_rng(1234)
    half = rng.permutation(len(pool))
    train, dev = half[:len(pool) // 2], half[len(pool) // 2:]
    sizes = sorted({min(args.seed_size + min(args.ks), len(train)), min(args.seed_size + max(args.ks), len(train))})
    draws = {n: [rng.choice(train, size=n, replace=False) for _ in range(5)] for n in sizes}
    return {wd: {n: float(np.mean([accuracy(train_head(pool[d], wd), pool[dev]) for d in draws[n]]))
                 for n in sizes} for wd in grid}


def summarise(per_seed: list[dict], args) -> dict:
    """Mean test accuracy per arm and k over seeds (95% bootstrap interval), and each active arm minus
    random, paired over seeds (paired bootstrap interval and p-value; sign test)."""
    from unipipe_ray.eval.stats import sign_test

    kw = dict(n_resamples=4000, seed=0)
    out = {"seed_only": entry([s["seed_only"] for s in per_seed], **kw), "arms": {}, "vs_random": {}}
    for arm in ARMS:
        out["arms"][arm] = {k: entry([s[arm][k] for s in per_seed], **kw) for k in args.ks}
    for arm in ARMS[1:]:
        out["vs_random"][arm] = {}
        for k in args.ks:
            a, b = [s["random"][k] for s in per_seed], [s[arm][k] for s in per_seed]
            sign = sign_test(a, b)
            out["vs_random"][arm][k] = compare_scores(a, b, binary=False, **kw) | {
                "wins": sign["wins"], "losses": sign["losses"], "ties": sign["ties"], "sign_p": sign["p_value"]}
    return out


def markdown(result: dict) -> str:
    s, rows = result["summary"], []
    ci = lambda e: f"{e['estimate']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"
    for k in result["settings"]["ks"]:
        cells = [ci(s["arms"][arm][k]) for arm in ARMS]
        for arm in ARMS[1:]:
            c = s["vs_random"][arm][k]
            cells.append(f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] p={c['p_value']:.2g} "
                         f"({c['wins']}/{c['losses']}/{c['ties']})")
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    head = ("| k | random | ensemble | margin | ensemble - random | margin - random |\n"
            "|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows) + f"\n\nseed set only ({result['settings']['seed_size']} pairs): " \
        f"{ci(s['seed_only'])}; whole pool ({result['settings']['pool']} pairs): {result['whole_pool']:.3f}\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="HH-RLHF style preference pairs (jsonl[.gz])")
    p.add_argument("--model", default="smollm2-135m", help="frozen backbone of the reward model")
    p.add_argument("--pool", type=int, default=500, help="unlabelled pool pairs")
    p.add_argument("--test", type=int, default=500, help="fixed held-out test pairs")
    p.add_argument("--seed-size", type=int, default=32, help="labelled pairs before selection")
    p.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128, 256], help="label budgets")
    p.add_argument("--rounds", type=int, default=4, help="selection rounds (retrain between rounds)")
    p.add_argument("--ensemble", type=int, default=3, help="heads in the disagreement ensemble")
    # 10: the best of 0.01..100 on pool-only dev halves (--tune); see results/active_learning.md
    p.add_argument("--weight-decay", type=float, default=10.0, help="L2 penalty of the linear head")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-prompt-length", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=str(cache_dir() / "active_learning"), help="feature cache directory")
    p.add_argument("--out", default="results/active_learning", help="writes OUT.json and OUT_table.md")
    p.add_argument("--tune", action="store_true", help="only print pool-only dev accuracy per weight decay")
    args = p.parse_args(argv)
    if max(args.ks) + args.seed_size > args.pool:
        p.error(f"seed set {args.seed_size} + k {max(args.ks)} exceeds the pool ({args.pool})")
    torch.set_num_threads(args.threads)
    start = time.time()
    pool, test, info = features(args)
    if args.tune:
        dev = tune_weight_decay(pool, args)
        print(json.dumps(dev, indent=1))
        return {"tune": dev}
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append(run_seed(seed, pool, test, args))
        print(f"seed {seed}: " + json.dumps({a: per_seed[-1][a] for a in ARMS}), file=sys.stderr)
    result = {"settings": vars(args), "data": info, "per_seed": per_seed, "summary": summarise(per_seed, args),
              "whole_pool": accuracy(train_head(pool, args.weight_decay), test),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
              "seconds": round(time.time() - start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}_table.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
