"""SFT stage: next-token NLL on the response tokens, run by Ray Train's TorchTrainer on N workers.

Driver: ``run_sft(config)`` loads and checks the data once, then starts the workers. Worker: ``train_loop``
is the whole training procedure, top to bottom: setup, loop, eval, save.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from unipipe_ray import distributed as dist
from unipipe_ray.config import SFTConfig, to_dict
from unipipe_ray.logps import token_logps
from unipipe_ray.losses import masked_sum, sft_loss
from unipipe_ray.stages import common


def response_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, T-1) of the response tokens of one micro-batch, and their mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_logps(logits, batch["labels"])


@torch.no_grad()
def evaluate(model, features: list[dict], batch_size: int, pad_id: int) -> dict:
    """Token-mean NLL over this rank's share of the eval set, reduced over ranks."""
    from unipipe_ray.data import collate_sft

    model.eval()
    total, count = torch.zeros(()), torch.zeros(())
    mine = features[dist.rank()::dist.world_size()]
    for i in range(0, len(mine), batch_size):
        logps, mask = response_logps(model, collate_sft(mine[i:i + batch_size], pad_id))
        total, count = total - masked_sum(logps, mask).double(), count + mask.sum()
    model.train()
    total, count = dist.all_reduce_sum(total), dist.all_reduce_sum(count)
    return {"sft/eval_loss": float(total / count.clamp(min=1))}


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    from transformers import AutoModelForCausalLM

    from unipipe_ray.data import collate_sft
    from unipipe_ray.models import resolve_model

    common.quiet_ray_train_logs()
    cfg: SFTConfig = loop_config["config"]
    train, data = cfg.train, cfg.data
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(train.seed)
    train_feats, eval_feats = ray.get(loop_config["train_ref"]), ray.get(loop_config["eval_ref"])
    pad_id = loop_config["pad_id"]

    dtype = getattr(torch, train.dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model), dtype=dtype, use_safetensors=True)
    model.config.use_cache = False
    world, rank = dist.world_size(), dist.rank()
    steps = common.total_steps(len(train_feats), train, world)
    engine = dist.Engine(model, train.lr, train.weight_decay, train.max_grad_norm, steps,
                         warmup_steps=int(train.warmup_ratio * steps))
    dist.print0(f"sft: {len(train_feats)} train / {len(eval_feats)} eval examples, {world} worker(s), "
                f"{steps} steps of {train.batch_size * train.grad_accum * world} examples")

    metrics = evaluate(engine.module, eval_feats, train.batch_size, pad_id) if eval_feats else {}
    dist.print0(f"sft: step 0/{steps} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    throughput, seen_tokens = common.Throughput(), 0.0
    for step in range(steps):
        batches = [collate_sft([train_feats[i] for i in idx], pad_id)
                   for idx in common.step_batches(len(train_feats), train.batch_size, train.grad_accum,
                                                  world, rank, step, data.seed)]
        # Normalise by the global response-token count / world: DDP's gradient mean then gives the exact
        # token mean over the whole step, whatever the split into ranks and micro-batches.
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        normalizer = float(dist.all_reduce_sum(local_tokens)) / world
        seen_tokens += float(dist.all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in batches)))
        step_loss = 0.0
        for batch in batches:
            loss = sft_loss(*response_logps(engine, batch), mode="token", normalizer=normalizer)
            engine.backward(loss)
            step_loss += float(loss.detach())
        info = engine.step()
        done = step + 1
        if done % train.log_every == 0 or done == steps:
            metrics = {"sft/loss": float(dist.all_reduce_mean(step_loss)), "sft/lr": info["lr"],
                       "sft/grad_norm": info["grad_norm"], "sft/tokens_per_s": throughput(seen_tokens),
                       "sft/peak_memory_mb": common.peak_memory_mb(torch.device("cpu")), "step": done}
            seen_tokens = 0.0
        if train.eval_every and done % train.eval_every == 0 and done != steps:
            metrics.update(evaluate(engine.module, eval_feats, train.batch_size, pad_id))
            metrics["step"] = done
        if metrics.get("step") == done and done != steps:
            dist.print0(f"sft: step {done}/{steps} " + " ".join(
                f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k != "step"))
            ray.train.report(metrics)

    if eval_feats:
        metrics.update(evaluate(engine.module, eval_feats, train.batch_size, pad_id))
    dist.print0(f"sft: step {steps}/{steps} (final) " + " ".join(
        f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k != "step"))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if dist.is_main():
            engine.module.config.use_cache = True
            engine.module.save_pretrained(tmp)
            loop_config["tokenizer"].save_pretrained(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def run_sft(cfg: SFTConfig, address: str | None = None) -> dict:
    """Train on a Ray cluster (local when no address); return metrics and the checkpoint path."""
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from unipipe_ray.models import load_tokenizer, resolve_model

    started = time.time()
    resolve_model(cfg.model)  # convert/download once on the driver, before workers race for it
    tokenizer = load_tokenizer(cfg.model)
    train_feats, eval_feats, _ = common.load_stage_data(cfg.data, "sft", tokenizer)
    common.init_ray(address)
    scaling, threads = common.scaling(cfg.train)
    output_dir = Path(cfg.output_dir).resolve()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg, "train_ref": ray.put(train_feats), "eval_ref": ray.put(eval_feats),
                           "pad_id": tokenizer.pad_token_id, "threads": threads,
                           "tokenizer": tokenizer},
        scaling_config=scaling,
        run_config=RunConfig(name="sft", storage_path=str(output_dir)),
    )
    result = trainer.fit()
    out = {"stage": "sft", "config": to_dict(cfg), "metrics": result.metrics,
           "checkpoint": result.checkpoint.path if result.checkpoint else None,
           "seconds": round(time.time() - started, 1)}
    common.write_result(output_dir, out)
    return out
