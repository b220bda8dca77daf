"""PPO's model roles as plain classes (``runtime.actors.ActorGroup`` makes them Ray actors).

    PolicyTrainer   the policy: old log-probs, clipped-ratio updates, its full state dict for weight sync
    CriticTrainer   the value model: per-token values, clipped value updates
    ReferenceModel  frozen KL reference: per-token log-probs
    RewardScorer    the reward model: one scalar per sequence (head at the last real token)

Trainers of one group form a process group (rank/world given at construction), so their updates are
data-parallel through ``runtime.engine.TrainingEngine`` (DDP or DeepSpeed ZeRO, like the other stages).

Devices: each role puts its model and every batch on ``device`` (default: the one Ray gave the actor,
``runtime.devices.actor_device``) and hands results back on the CPU. ``dtype`` "bfloat16" means bf16 compute:
trainers keep fp32 master weights under DeepSpeed (DDP trains in bf16), frozen models load in bf16.
"""

from __future__ import annotations

import logging

import torch

from unipipe_ray.core.losses import masked_sum, ppo_policy_loss, reduce_loss, value_loss
from unipipe_ray.core.models import node_model
from unipipe_ray.core.rl import kl_penalty, logp_gap
from unipipe_ray.core.sequences import (
    gather_response,
    logits_to_keep,
    model_inputs,
    response_grid_logps,
    response_grid_logps_entropy,
    response_mask,
    to_batch,
)
from unipipe_ray.core.shared_prefix import shared_batch, shared_prefix_logits
from unipipe_ray.core.storage import localize, writing_to
from unipipe_ray.runtime import devices
from unipipe_ray.runtime import distributed as dist
from unipipe_ray.runtime.devices import device_name, torch_dtype
from unipipe_ray.runtime.engine import TrainingEngine


def _device(device, threads: int | None) -> torch.device:
    """The role's device (given, or the one Ray assigned) made current; CPU threads set."""
    if threads:
        torch.set_num_threads(threads)
    device = devices.resolve(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DeepSpeed and NCCL use the current device
    return device


def _setup(seed: int, rank: int, world: int, master) -> tuple | None:
    """Seed, and (``master``: the group's meeting point, runtime.actors.Meeting) the process group, hosted by
    rank 0 on its own node. Returns the (address, port) the group met at."""
    torch.manual_seed(seed + rank)
    if master is None:
        return None
    from unipipe_ray.runtime.actors import meet

    address = meet(master, rank)
    dist.init_group(rank, world, *address)
    return address


def _minibatches(n: int, size: int, epoch: int, seed: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i:i + size] for i in range(0, n, size)]


def _select(samples, idx):
    return [samples[i] for i in idx]


def _batch(samples, pad_id: int, device, share_prompts: bool) -> dict:
    """The samples as a batch: samples sharing a prompt forward it once (core.shared_prefix) when
    ``share_prompts`` and some prompt repeats, else the plain left-padded rows."""
    return (share_prompts and shared_batch(samples, pad_id, device)) or to_batch(samples, pad_id, device)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature; at temperature 1 the logits themselves (a division is one more (N, K, V)
    tensor, and its gradient another)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def _kept_logits(model, batch, prefix_model=None) -> torch.Tensor:
    """Logits of the last R + 1 positions (the states that emit response tokens), either layout."""
    if "prefix_ids" in batch:
        return shared_prefix_logits(model, batch, prefix_model)
    return model(**model_inputs(batch), logits_to_keep=logits_to_keep(batch)).logits


class PolicyTrainer:
    def __init__(self, model_path: str, lr: float, pad_id: int, temperature: float, clip_eps: float,
                 max_grad_norm: float = 1.0, total_updates: int = 1000, backend: str = "ddp", zero_stage: int = 0,
                 seed: int = 0, threads: int | None = None, rank: int = 0, world: int = 1, master=None,
                 dtype: str = "float32", device=None, share_prompts: bool = True):
        model_path = node_model(model_path)  # this node's copy (core.models.shareable_model)
        from transformers import AutoModelForCausalLM

        self.device, self.share_prompts = _device(device, threads), share_prompts
        self.group_address = _setup(seed, rank, world, master)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
        model.config.use_cache = False
        self.engine = TrainingEngine(model.to(self.device), lr, 0.0, max_grad_norm, total_updates, warmup_steps=0,
                                     backend=backend, zero_stage=zero_stage, bf16=dtype == "bfloat16")
        self.pad_id, self.temperature, self.clip_eps, self.seed = pad_id, temperature, clip_eps, seed
        self.sync_dtype = torch_dtype(dtype)  # what the engines hold: the weight sync sends this dtype

    def device_name(self) -> str:
        return device_name(self.engine.module)

    def _forward(self, model, batch):
        """Logits / temperature of the last R + 1 positions only: the LM head never runs over the prompt."""
        return _tempered(_kept_logits(model, batch, self.engine.module), self.temperature)

    @torch.no_grad()
    def logps(self, samples) -> torch.Tensor:
        """(N, R) log-probs of the responses under the current policy (PPO's old log-probs)."""
        batch = _batch(samples, self.pad_id, self.device, self.share_prompts)
        return response_grid_logps(self._forward(self.engine.module, batch), batch).cpu()

    def update(self, samples, old_logps, advantages, epochs: int, minibatch_size: int, iteration: int,
               ref_logps=None, kl_coef: float = 0.0, kl_estimator: str = "k3") -> dict:
        """PPO epochs over minibatches of this worker's samples; returns means over all workers.

        ``old_logps`` None: the update is one step over every sample (rl.old_logps_needed), and the training
        forward's detached log-probs are the old ones; that forward also checks the rollout engine's log-probs
        of the same tokens ("ppo/rollout_logp_max_diff", this worker's). ``ref_logps`` given: the KL to the
        reference is in the loss (kl_in: loss) with ``kl_coef``."""
        if old_logps is None and (epochs != 1 or len(samples) > minibatch_size):
            raise ValueError("PPO update without old log-probs needs one epoch over one minibatch; got "
                             f"{epochs} epochs, {len(samples)} samples, minibatch_size {minibatch_size}")
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, clipped, entropy, approx_kl, kl
        tokens, gap = 0.0, None
        advantages = advantages.to(self.device)
        old_logps = old_logps.to(self.device) if old_logps is not None else None
        ref_logps = ref_logps.to(self.device) if ref_logps is not None else None
        for epoch in range(epochs):
            for idx in _minibatches(len(samples), minibatch_size, epoch, self.seed + iteration):
                batch = _batch(_select(samples, idx), self.pad_id, self.device, self.share_prompts)
                mask = response_mask(batch)
                r = mask.shape[1]
                adv = advantages[idx, :r]
                n_tokens = float(dist.all_reduce_sum(float(mask.sum())))
                # the entropy (a metric) comes without gradient from the same pass as the log-probs
                logps, entropy = response_grid_logps_entropy(self._forward(self.engine, batch), batch)
                old = logps.detach() if old_logps is None else old_logps[idx, :r]
                losses, clipped = ppo_policy_loss(logps, old, adv, self.clip_eps)
                kl = torch.zeros_like(losses)
                if ref_logps is not None:
                    kl = kl_penalty(logps, ref_logps[idx, :r], kl_estimator)
                    losses = losses + kl_coef * kl
                # Token sum / (global tokens / world): the gradient mean over workers is the global token mean.
                self.engine.backward(reduce_loss(losses, mask, mode="token", normalizer=n_tokens / dist.world_size()))
                info = self.engine.step()
                with torch.no_grad():
                    if old_logps is None:
                        gap = logp_gap([samples[i].logps for i in idx], logps.detach().cpu(), mask.cpu())
                    sums += torch.stack([masked_sum(losses, mask), masked_sum(clipped, mask),
                                         masked_sum(entropy, mask), masked_sum(old - logps, mask),
                                         masked_sum(kl, mask)]).double()
                tokens += float(mask.sum())
        sums, tokens = dist.all_reduce_sum(sums.cpu()), float(dist.all_reduce_sum(tokens))
        loss, clipfrac, entropy, approx_kl, _ = (sums / max(tokens, 1.0)).tolist()
        out = {"ppo/policy_loss": loss, "ppo/clip_fraction": clipfrac, "ppo/entropy": entropy,
               "ppo/approx_kl": approx_kl, "ppo/grad_norm": info["grad_norm"]}
        if ref_logps is not None:  # KL per sequence over the update's forwards (one step: the sampling policy's)
            sequences = float(dist.all_reduce_sum(float(len(samples) * epochs)))  # every rank: kl_in is global
            out["ppo/kl_in_loss"] = float(sums[4]) / max(sequences, 1.0)
        if gap is not None:
            out["ppo/rollout_logp_max_diff"] = gap
        return out

    def state_dict(self) -> dict | None:
        """The full policy state dict on rank 0 in the engines' dtype, on the CPU (it goes through the object
        store, which would copy a GPU tensor to the CPU anyway); None on other ranks."""
        return self.engine.full_state_dict("cpu", self.sync_dtype)

    def weight_specs(self) -> list:
        """(name, dtype, shape) of what ``send_weights`` broadcasts: the engines allocate their buffers by it."""
        return self.engine.full_specs(self.sync_dtype)

    def placement(self) -> tuple[str, tuple | None]:
        """(this actor's node IP, the address its process group met at): where a group really formed."""
        import ray

        return ray.util.get_node_ip_address(), self.group_address

    def meeting_point(self) -> tuple[str, int]:
        """(this node's IP, a port free on it): where this rank can host a group the engines join."""
        import ray

        return ray.util.get_node_ip_address(), dist.free_port()

    def join_weight_group(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 becomes rank 0 of the engines' weight group (ppo.weight_sync)."""
        if dist.is_main():
            from unipipe_ray.ppo.weight_sync import WeightSender

            # from the trainer's device: NCCL from its GPU, gloo from the CPU
            self.sender = WeightSender(host, port, world_size, self.device)

    def send_weights(self) -> None:
        """Every rank gathers (collective under ZeRO-3); rank 0 broadcasts to the engines, from its device."""
        full = self.engine.full_state_dict(self.device, self.sync_dtype)
        if dist.is_main():
            self.sender.send(full)

    def save(self, directory: str, tokenizer_dir: str) -> None:
        """The weights in Hugging Face format, to a path or a URI (each rank uploads what it wrote)."""
        with writing_to(directory) as local:
            _save_pretrained(self.engine, local, tokenizer_dir)

    def save_checkpoint(self, directory: str, tokenizer_dir: str) -> None:
        """Weights (Hugging Face format, the init of a resumed trainer) plus optimizer and schedule state."""
        with writing_to(directory) as local:
            _save_pretrained(self.engine, local, tokenizer_dir)
            self.engine.save_state(f"{local}/engine")

    def load_checkpoint(self, directory: str) -> None:
        """Optimizer and schedule state from save_checkpoint (the weights came in through model_path)."""
        self.engine.load_state(f"{localize(directory)}/engine")


def _save_pretrained(engine, directory: str, tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    full = engine.full_state_dict()  # collective: every rank calls it
    if dist.is_main():
        engine.module.save_pretrained(directory, state_dict=full)
        # the input model's tokenizer as this node has it: a built-in name or a URI is not a directory here
        AutoTokenizer.from_pretrained(node_model(tokenizer_dir)).save_pretrained(directory)


class CriticTrainer:
    """Values V(s) per response token from a sequence classifier's head applied at every position."""

    def __init__(self, model_path: str, lr: float, pad_id: int, clip_eps: float, max_grad_norm: float = 1.0,
                 total_updates: int = 1000, seed: int = 0, threads: int | None = None, rank: int = 0,
                 world: int = 1, master=None, dtype: str = "float32", device=None):
        model_path = node_model(model_path)  # this node's copy (core.models.shareable_model)
        from transformers import AutoModelForSequenceClassification

        self.device = _device(device, threads)
        self.group_address = _setup(seed, rank, world, master)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32,
                                                                   use_safetensors=True)
        model.config.pad_token_id = pad_id
        self.engine = TrainingEngine(model.to(self.device), lr, 0.0, max_grad_norm, total_updates, warmup_steps=0,
                                     bf16=dtype == "bfloat16")
        self.pad_id, self.clip_eps, self.seed = pad_id, clip_eps, seed

    def device_name(self) -> str:
        return device_name(self.engine.module)

    def _values(self, model, batch) -> torch.Tensor:
        out = model(**model_inputs(batch), output_hidden_states=True)
        states = gather_response(out.hidden_states[-1], batch)
        return self.engine.module.score(states).squeeze(-1).float()

    @torch.no_grad()
    def values(self, samples) -> torch.Tensor:
        batch = to_batch(samples, self.pad_id, self.device)
        return self._values(self.engine.module, batch).masked_fill(~response_mask(batch), 0.0).cpu()

    def update(self, samples, old_values, returns, epochs: int, minibatch_size: int, iteration: int) -> dict:
        total, tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0.0
        old_values, returns = old_values.to(self.device), returns.to(self.device)
        for epoch in range(epochs):
            for idx in _minibatches(len(samples), minibatch_size, epoch, self.seed + iteration):
                batch = to_batch(_select(samples, idx), self.pad_id, self.device)
                mask = response_mask(batch)
                r = mask.shape[1]
                n_tokens = float(dist.all_reduce_sum(float(mask.sum())))
                losses = value_loss(self._values(self.engine, batch), old_values[idx, :r], returns[idx, :r],
                                    self.clip_eps)
                self.engine.backward(reduce_loss(losses, mask, mode="token", normalizer=n_tokens / dist.world_size()))
                self.engine.step()
                total += masked_sum(losses.detach(), mask).double()
                tokens += float(mask.sum())
        return {"ppo/value_loss": float(dist.all_reduce_sum(total.cpu())) / max(float(dist.all_reduce_sum(tokens)),
                                                                                1.0)}

    save_checkpoint = PolicyTrainer.save_checkpoint
    load_checkpoint = PolicyTrainer.load_checkpoint


class ReferenceModel:
    def __init__(self, model_path: str, pad_id: int, temperature: float, threads: int | None = None,
                 dtype: str = "float32", device=None, share_prompts: bool = True):
        model_path = node_model(model_path)  # this node's copy (core.models.shareable_model)
        from transformers import AutoModelForCausalLM

        self.device = _device(device, threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype),
                                                          use_safetensors=True).to(self.device).eval()
        self.pad_id, self.temperature, self.share_prompts = pad_id, temperature, share_prompts

    def device_name(self) -> str:
        return device_name(self.model)

    @torch.no_grad()
    def logps(self, samples) -> torch.Tensor:
        batch = _batch(samples, self.pad_id, self.device, self.share_prompts)
        return response_grid_logps(_tempered(_kept_logits(self.model, batch), self.temperature), batch).cpu()


class RewardScorer:
    def __init__(self, model_path: str, pad_id: int, threads: int | None = None, batch_size: int = 32,
                 seed: int = 0, dtype: str = "float32", device=None):
        model_path = node_model(model_path)  # this node's copy (core.models.shareable_model)
        from transformers import AutoModelForSequenceClassification

        self.device = _device(device, threads)
        # Seeded: a checkpoint without a trained score head gets a random one, and every reward actor (and a
        # restarted one) must draw the same head, or they would score the same text differently.
        torch.manual_seed(seed)
        self.model, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, dtype=torch_dtype(dtype), use_safetensors=True, output_loading_info=True)
        self.model.to(self.device).eval()
        if info["missing_keys"]:
            logging.getLogger(__name__).warning(
                "reward model %s has no trained weights for %s: randomly initialised (seed %d); train one with "
                "the rm stage", model_path, ", ".join(info["missing_keys"]), seed)
        self.pad_id, self.batch_size = pad_id, batch_size

    def device_name(self) -> str:
        return device_name(self.model)

    @torch.no_grad()
    def score(self, samples) -> list[float]:
        from unipipe_ray.core.reward_head import rewards

        out = []
        for i in range(0, len(samples), self.batch_size):
            batch = to_batch(samples[i:i + self.batch_size], self.pad_id, self.device)
            out.extend(rewards(self.model, self.model, batch).cpu().tolist())
        return out
