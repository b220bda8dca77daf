"""A DPO stage's data at 10k, 100k and 1M preference pairs: the direct path vs the tokenized cache.

    python bench/data_scale.py --sizes 10000,100000,1000000 --out results/data_scale_cpu.md

Paths:
  direct   what the stages did before the cache: the driver reads and tokenizes every pair
           (data.stage_data.load_stage_data), puts the feature lists in the object store and every Ray Train
           worker fetches all of them (``run_stage(features=...)``)
  cache    runtime.data_prep: shards tokenized by Ray Data tasks into Arrow files (cold), or found in the
           cache (warm); the workers get row numbers and memory-map the rows of their micro-batches

Every measurement is its own subprocess with its own local Ray cluster, one after another (the two cores are
never shared between measurements): a DPO stage on the tiny model (random-init Llama, SmolLM2's tokenizer),
2 Ray Train workers, one optimizer step of 8 pairs x <= 512 tokens. Reported: wall time from the stage call to
the end of its first (and only) step, final save included; the driver's peak RSS; rank 0's peak RSS (the
stage's own peak-memory metric); and, separately, tokenization throughput of the cache path with Ray Data
given 1 and 2 CPUs. The pairs are synthetic with HH-RLHF-like lengths (prompt ~70 words, responses ~45),
written once per size under --workdir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("data_scale")

WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this from or "
         "had by hot word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make thing "
         "see him two has look more day could go come did number sound no most people my over know water than "
         "call first who may down side been now find any new work part take get place made live where after "
         "back little only round man year came show every good me give our under name very through just form "
         "sentence great think say help low line differ turn cause much mean before move right boy old too "
         "same tell does set three want air well also play small end put home read hand port large spell add "
         "even land here must big high such follow act why ask men change went light kind off need house "
         "picture try us again animal point mother world near build self earth father").split()


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """``n`` HH-like pairs: a two-turn prompt, a chosen and a rejected answer that differ."""
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choices(WORDS, k=k))
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"{text(rng.randint(20, 60))}?\n\nAssistant: {text(rng.randint(5, 30))}.\n\nHuman: {text(12)}?"
            f.write(json.dumps({"prompt": prompt, "chosen": f"{text(rng.randint(20, 70))} ({i})",
                                "rejected": f"{text(rng.randint(20, 70))} [{i}]"}) + "\n")


def dpo_config(data_path: Path, out: Path, cache_dir: Path):
    from unipipe_ray.config import DPOConfig, load_config

    return load_config(DPOConfig, overrides=[
        "model=tiny", f"output_dir={out}", f"data.sources=[{{path: {data_path}}}]", "data.eval_size=16",
        "data.max_length=512", f"data.cache_dir={cache_dir}", "data.tokenize_with=ray_data",
        "train.num_workers=2", "train.batch_size=4", "train.max_steps=1", "train.warmup_ratio=0"])


def measure_stage(args) -> dict:
    """One stage run (this process is the driver)."""
    from unipipe_ray.core.models import load_tokenizer
    from unipipe_ray.runtime.cluster import init_ray
    from unipipe_ray.runtime.launch import run_stage
    from unipipe_ray.stages import dpo

    cfg = dpo_config(Path(args.data), Path(args.run_dir), Path(args.cache_dir))
    init_ray(num_cpus=args.cpus)
    started = time.time()
    features = None
    if args.path == "direct":
        from unipipe_ray.data.stage_data import load_stage_data

        features = load_stage_data(cfg.data, "preference", load_tokenizer(cfg.model))[:2]
    from unipipe_ray.core.models import shareable_model

    result = run_stage("dpo", dpo.train_loop, cfg, "preference", features=features,
                       extra={"ref_path": shareable_model(cfg.model)})
    m = result["metrics"]
    return {"seconds_to_first_step": round(time.time() - started, 1),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "worker_peak_rss_mb": round(m.get("dpo/peak_memory_mb", float("nan"))),
            "rows_read_max": m.get("data/rows_read_max"), "data": result.get("data"),
            "train_examples": result["train_examples"]}


def measure_tokenize(args) -> dict:
    """Tokenization alone, cache path on Ray Data with ``--cpus`` CPUs (a fresh cache directory)."""
    from unipipe_ray.core.models import load_tokenizer
    from unipipe_ray.runtime.cluster import init_ray
    from unipipe_ray.runtime.data_prep import prepare_stage_data

    cfg = dpo_config(Path(args.data), Path(args.run_dir), Path(args.cache_dir))
    init_ray(num_cpus=args.cpus)
    started = time.time()
    _, _, info = prepare_stage_data(cfg.data, "preference", load_tokenizer(cfg.model), args.cache_dir,
                                    executor="ray_data")
    seconds = time.time() - started
    return {"seconds": round(seconds, 1), "pairs_per_s": round(info["records"] / seconds), "records": info["records"]}


def run_one(workdir: Path, what: str, size: int, path: str, cpus: int, cache_dir: Path, timeout: int) -> dict:
    data = workdir / f"pairs_{size}.jsonl"
    run_dir = workdir / f"run_{what}_{path}_{size}_{cpus}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, __file__, "--one", what, "--data", str(data), "--path", path, "--cpus", str(cpus),
           "--run-dir", str(run_dir / "dpo"), "--cache-dir", str(cache_dir)]
    log.info("%s %s %d pairs, %d CPU(s) ...", what, path, size, cpus)
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout)[-1500:]
        log.warning("failed (rc %s):\n%s", proc.returncode, tail)
        return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}
    out = json.loads(line[len("RESULT "):])
    log.info("  %s (%.0f s)", {k: v for k, v in out.items() if k != "data"}, time.time() - started)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--direct-up-to", type=int, default=100_000,
                    help="largest size the direct path runs at (its feature lists outgrow this machine's memory)")
    ap.add_argument("--throughput-size", type=int, default=100_000)
    ap.add_argument("--workdir", default="/tmp/data_scale")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default="results/data_scale_cpu.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite --out from its .json")
    ap.add_argument("--one", choices=["stage", "tokenize"])
    ap.add_argument("--data")
    ap.add_argument("--path", choices=["direct", "cache-cold", "cache-warm"], default="cache-cold")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--run-dir")
    ap.add_argument("--cache-dir")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.report_only:  # the report again from the JSON a run wrote
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_report(Path(args.out), {int(k): v for k, v in saved["rows"].items()}, args)
        return
    if args.one:
        out = measure_stage(args) if args.one == "stage" else measure_tokenize(args)
        print("RESULT " + json.dumps(out), flush=True)
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {}
    for size in sizes:
        data = workdir / f"pairs_{size}.jsonl"
        if not data.exists():
            log.info("writing %d synthetic pairs ...", size)
            write_pairs(data, size)
        cache_dir = workdir / f"cache_{size}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        row = {"file_mb": round(data.stat().st_size / 2**20)}
        if size <= args.direct_up_to:
            row["direct"] = run_one(workdir, "stage", size, "direct", 2, cache_dir, args.timeout)
        row["cache-cold"] = run_one(workdir, "stage", size, "cache-cold", 2, cache_dir, args.timeout)
        row["cache-warm"] = run_one(workdir, "stage", size, "cache-warm", 2, cache_dir, args.timeout)
        if size == args.throughput_size:
            for cpus in (1, 2):
                row[f"tokenize-{cpus}cpu"] = run_one(workdir, "tokenize", size, "cache-cold", cpus,
                                                    workdir / f"tok_{size}_{cpus}", args.timeout)
                shutil.rmtree(workdir / f"tok_{size}_{cpus}", ignore_errors=True)
        rows[size] = row
        shutil.rmtree(cache_dir, ignore_errors=True)
    write_report(Path(args.out), rows, args)


def _cell(entry: dict | None, key: str) -> str:
    if entry is None:
        return "not run"
    if "error" in entry:
        return f"failed: {entry['error'][:60]}"
    value = entry.get(key)
    return "" if value is None else str(value)


def _reading(rows: dict) -> list[str]:
    """The targets, computed from the rows: memory flat in size (largest within 1.5x of smallest), the first
    step on a warm cache within a minute, and what the direct path's growth would need at the largest size."""
    ok = lambda e: e is not None and "error" not in e  # noqa: E731
    sizes = sorted(rows)
    small, large = rows[sizes[0]], rows[sizes[-1]]
    out = []
    if ok(small.get("cache-cold")) and ok(large.get("cache-cold")):
        for key, what in (("driver_peak_rss_mb", "driver"), ("worker_peak_rss_mb", "rank-0 worker")):
            ratio = large["cache-cold"][key] / small["cache-cold"][key]
            out.append(f"- cache path, {what} peak RSS at {sizes[-1]:,} / at {sizes[0]:,} pairs: {ratio:.2f}x "
                       f"(target <= 1.5x)")
    if ok(large.get("cache-warm")):
        warm, cold = large["cache-warm"]["seconds_to_first_step"], large["cache-cold"].get("seconds_to_first_step")
        out.append(f"- first step at {sizes[-1]:,} pairs on a warm cache: {warm} s (target <= 60 s); cold "
                   f"(tokenizing included): {cold} s")
    direct = [(n, rows[n]["direct"]) for n in sizes if ok(rows[n].get("direct"))]
    if len(direct) >= 2 and "direct" not in large:
        (n0, a), (n1, b) = direct[0], direct[-1]
        for key, what in (("driver_peak_rss_mb", "driver"), ("worker_peak_rss_mb", "each worker")):
            slope = (b[key] - a[key]) / (n1 - n0)
            out.append(f"- direct path, {what}: {a[key]} MB at {n0:,} and {b[key]} MB at {n1:,} pairs, so about "
                       f"{(b[key] + slope * (sizes[-1] - n1)) / 1024:.0f} GB at {sizes[-1]:,} if it stays linear "
                       f"(extrapolated, not measured)")
    return out


def write_report(out: Path, rows: dict, args) -> None:
    import ray
    import torch

    from unipipe_ray.runtime.devices import cpu_model

    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cpu = cpu_model()
    lines = ["# Data at scale: the direct path vs the tokenized cache (CPU)", "",
             "Written by `bench/data_scale.py` (see bench/README.md).", "",
             f"- date: {stamp}, host {platform.node()}", f"- CPU: {cpu} ({os.cpu_count()} cores), "
             f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
             f"- versions: python {platform.python_version()}; torch {torch.__version__}; ray {ray.__version__}",
             "- DPO stage, tiny model, 2 Ray Train workers, 1 step of 8 pairs x <= 512 tokens; synthetic HH-like "
             "pairs", "",
             "| pairs | file MB | path | seconds to first step | driver peak RSS MB | rank-0 peak RSS MB | "
             "rows a worker read (max) |", "|---|---|---|---|---|---|---|"]
    for size, row in rows.items():
        for path in ("direct", "cache-cold", "cache-warm"):
            entry = row.get(path)
            if entry is None and path == "direct":
                lines.append(f"| {size:,} | {row['file_mb']} | direct | not run (above --direct-up-to "
                             f"{args.direct_up_to:,}: see below) | | | |")
                continue
            lines.append(f"| {size:,} | {row['file_mb']} | {path} | {_cell(entry, 'seconds_to_first_step')} | "
                         f"{_cell(entry, 'driver_peak_rss_mb')} | {_cell(entry, 'worker_peak_rss_mb')} | "
                         f"{_cell(entry, 'rows_read_max') or 'all (fetched whole)'} |")
    lines += ["", "Tokenization throughput (cache path, Ray Data, fresh cache):", "",
              "| pairs | CPUs | seconds | pairs/s |", "|---|---|---|---|"]
    for size, row in rows.items():
        for cpus in (1, 2):
            entry = row.get(f"tokenize-{cpus}cpu")
            if entry is not None:
                lines.append(f"| {size:,} | {cpus} | {_cell(entry, 'seconds')} | {_cell(entry, 'pairs_per_s')} |")
    lines += ["", *_reading(rows)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"date": stamp, "rows": rows}, indent=1, default=str))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
