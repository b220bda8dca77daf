"""The training engine: model + AdamW + warmup/cosine schedule + clipping, data-parallel over the current
process group through torch DDP or DeepSpeed ZeRO 0-3, with the state an exact resume needs.

The stage loops (runtime/loop.py) and PPO's trainers (ppo/roles.py) drive it the same way on one process or
many and with either backend. It is the *training* engine; PPO's rollout engines (ppo/rollout.py) sample.
DeepSpeed is imported lazily: importing it is slow and probes for accelerators.
"""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from unipipe_ray.runtime.distributed import free_port, is_main, world_size

BETAS = (0.9, 0.95)
_DDP_STATE_FILE = "engine_state.pt"
_DS_TAG = "engine"  # DeepSpeed checkpoint sub-directory; fixed so load_state needs no 'latest' lookup


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warmup from 0 to 1 over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases and norm weights (1-D tensors), the usual AdamW practice.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # No empty group: ZeRO drops it, and the LR schedule (built on our groups) then no longer lines up with
    # DeepSpeed's (LoRA trains only 2-D matrices, so its no-decay group is empty).
    return [g for g in groups if g["params"]]


def _computed_fp32_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 buffers the model computes at init rather than loads (not in its state dict): rotary
    frequencies. Casting the module to bf16 (ours under DDP, DeepSpeed's under bf16) would cast them too,
    shifting every rotary position, while a model loaded in bf16 (the reference, the rollout engines) keeps
    them in fp32: the trainer's log-probs would then disagree with theirs beyond bf16 rounding."""
    persistent = set(model.state_dict().keys())
    return {name: buf.detach().clone() for name, buf in model.named_buffers()
            if name not in persistent and buf.dtype == torch.float32}


def _restore_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, value in saved.items():
        owner, _, attr = name.rpartition(".")
        sub = model.get_submodule(owner)
        current = getattr(sub, attr)
        if current.dtype != value.dtype:
            setattr(sub, attr, value.to(current.device))


def _import_deepspeed():
    """Import DeepSpeed with its process group in place (Ray Train's, or a one-process group)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at DeepSpeed's first accelerator probe
    if not dist.is_initialized():
        # No launcher: without these DeepSpeed goes looking for MPI. setdefault keeps torchrun's values.
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            os.environ.setdefault(key, value)
    import deepspeed

    backend = dist.get_backend() if dist.is_initialized() else ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)  # reuses an existing process group
    return deepspeed


def deepspeed_config(grad_accum: int, zero_stage: int, offload_optimizer: bool, bf16: bool,
                     max_grad_norm: float) -> dict:
    """The DeepSpeed config for our loop: we feed micro-batches ourselves, so the batch size is nominal."""
    zero = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": max(0.0, max_grad_norm), "zero_optimization": zero,
            "bf16": {"enabled": bf16}, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


class TrainingEngine:
    """Model + AdamW + warmup/cosine schedule + clipping, data-parallel over the current process group.

    ``engine(**batch)`` runs the forward, ``backward(loss)`` once per micro-batch, ``step()`` once per
    optimizer step (clip, update, advance the schedule, zero gradients). Gradients are averaged over ranks,
    and neither backend divides by grad_accum, so losses must be normalised for the whole step: global
    token count divided by the world size (see ``losses.reduce_loss``).

    backend "ddp": torch DDP (plain module on one process). backend "deepspeed": ZeRO ``zero_stage`` 0-3 and
    optional optimizer offload to CPU. Both give the same update in fp32; ``bf16`` casts the module to bf16.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, max_grad_norm: float,
                 total_steps: int, warmup_steps: int, *, grad_accum: int = 1, backend: str = "ddp",
                 zero_stage: int = 0, offload_optimizer: bool = False, bf16: bool = False):
        if backend not in ("ddp", "deepspeed"):
            raise ValueError(f"unknown backend {backend!r}; expected 'ddp' or 'deepspeed'")
        if backend == "ddp" and (zero_stage or offload_optimizer):
            raise ValueError("zero_stage and offload_optimizer need backend='deepspeed'")
        if offload_optimizer and zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        self.module, self.backend, self.grad_accum = model, backend, grad_accum
        self.max_grad_norm = max_grad_norm
        self._micro = 0  # backward passes since the last step()
        schedule = lambda s: warmup_cosine(s, warmup_steps, total_steps)
        computed = _computed_fp32_buffers(model)
        if backend == "ddp":
            if bf16:  # weights, gradients and optimizer state in bf16 (DeepSpeed keeps fp32 master weights)
                model.to(torch.bfloat16)
            _restore_buffers(model, computed)  # before DDP, which broadcasts buffers from rank 0
            self.model = torch.nn.parallel.DistributedDataParallel(model) if world_size() > 1 else model
            self.optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=BETAS)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        else:
            self._init_deepspeed(lr, weight_decay, schedule,
                                 deepspeed_config(grad_accum, zero_stage, offload_optimizer, bf16, max_grad_norm))
            _restore_buffers(self.module, computed)

    def _init_deepspeed(self, lr: float, weight_decay: float, schedule, config: dict) -> None:
        deepspeed = _import_deepspeed()
        groups = _param_groups(self.module, weight_decay)
        if config["zero_optimization"].get("offload_optimizer"):
            # ZeRO-Offload refuses a torch optimizer (zero_force_ds_cpu_optimizer); its CPU Adam is the fast one
            # for this, at the price of a one-time JIT build (45-110 s on 2 cores, cached in torch_extensions).
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(groups, lr=lr, betas=BETAS, adamw_mode=True)
        else:
            # A client optimizer: one from the DeepSpeed config would be JIT-compiled first (~45 s on CPU).
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=BETAS)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=self.scheduler, config=config)

    def __call__(self, *args, **kwargs):
        if self.backend == "ddp" and world_size() > 1 and self._micro < self.grad_accum - 1:
            # DDP decides in the forward whether the coming backward all-reduces: only the last micro-batch does.
            with self.model.no_sync():
                return self.model(*args, **kwargs)
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._micro += 1
        if self.backend == "ddp":
            loss.backward()
            return
        # The loss is already normalised for the whole step, so no 1/grad_accum here. DeepSpeed counts
        # micro-batches through step(); the one that ends the optimizer step is left to TrainingEngine.step().
        self.model.backward(loss, scale_wrt_gas=False)
        if self._micro < self.grad_accum:
            self.model.step()

    def step(self) -> dict:
        """One optimizer step; returns the pre-clip gradient norm and the LR used."""
        if self._micro != self.grad_accum and (self.backend == "deepspeed" or
                                               (self.grad_accum > 1 and world_size() > 1)):
            # Either backend would otherwise update on a partial step or leave gradients unsynchronised.
            raise RuntimeError(f"step() after {self._micro} backward passes; this engine expects grad_accum="
                               f"{self.grad_accum}")
        self._micro = 0
        lr = self.scheduler.get_last_lr()[0]
        if self.backend == "deepspeed":
            return {"grad_norm": self._deepspeed_step(), "lr": lr}
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = _grad_norm(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, "lr": lr}

    def _deepspeed_step(self) -> float:
        # ZeRO and DeepSpeed's bf16 optimizer keep the norm they clip with; stage 0 in fp32 clips without
        # keeping it, so measure it here on the already all-reduced gradients (DeepSpeed then clips).
        norm = None
        if self.model.zero_optimization_stage() == 0 and not self.model.bfloat16_enabled():
            norm = _grad_norm([p for p in self.module.parameters() if p.requires_grad], 0.0)
        self.model.step()
        if norm is None:
            norm = self.model.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def state_dict(self) -> dict:
        """Optimizer and schedule state of the DDP backend (DeepSpeed's lives in save_state)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_state(self, directory: str | os.PathLike) -> None:
        """Write what an exact resume needs besides the model weights; every rank must call it.

        DDP: rank 0 writes the (replicated) optimizer + schedule state. DeepSpeed: its own checkpoint, each
        rank writing its own optimizer partition (and, as DeepSpeed always does, the module weights).
        """
        Path(directory).mkdir(parents=True, exist_ok=True)
        if self.backend == "deepspeed":
            self.model.save_checkpoint(str(directory), tag=_DS_TAG)
            return
        if is_main():
            torch.save(self.state_dict(), Path(directory) / _DDP_STATE_FILE)
        if world_size() > 1:
            dist.barrier()  # the other ranks may read the file right after

    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore what save_state wrote (for DeepSpeed also the module weights); every rank must call it."""
        if self.backend == "deepspeed":
            path, _ = self.model.load_checkpoint(str(directory), tag=_DS_TAG)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint '{_DS_TAG}' in {directory}")
            return
        self.load_state_dict(torch.load(Path(directory) / _DDP_STATE_FILE, map_location="cpu", weights_only=True))

    def close(self) -> None:
        """Release what the backend holds once training is over; every rank calls it (DeepSpeed may sync).

        A DeepSpeed engine sits in reference cycles (hooks, optimizer, module back-references), so without
        this it lives on, with its optimizer buffers and its handles on the process group, into interpreter
        finalization. ``module`` stays usable for saving or scoring.
        """
        if self.backend == "deepspeed" and self.model is not None:
            self.model.destroy()  # removes ZeRO's gradient hooks and frees its buffers
            # destroy() leaves the engine's forward/backward hooks on our module, and they keep the whole
            # engine alive for as long as the module lives.
            _drop_hooks_of(self.module, self.model)
        self.model = self.optimizer = self.scheduler = None
        gc.collect()

    def full_state_dict(self, device="cpu", dtype: torch.dtype | None = torch.float32) -> dict | None:
        """The full model state dict on rank 0 (fp32 on the CPU unless asked otherwise: a weight sync over
        NCCL wants it on the trainer's GPU in the engines' dtype), None elsewhere; every rank must call it.

        With DeepSpeed the parameters come from the optimizer's fp32 master copy (bf16 or ZeRO), gathered
        from every rank's partition under ZeRO-3; tied weights appear under each of their names.
        """
        full, cache = {}, {}
        keys = list(self.module.state_dict().keys())  # under ZeRO-3 the values are empty placeholders
        for name, param in self.module.named_parameters(remove_duplicate=False):
            if id(param) not in cache:  # every rank walks the same order: the gathers are collective
                cache[id(param)] = self._full_param(param)
            full[name] = cache[id(param)]
        full.update((name, buf) for name, buf in self.module.named_buffers() if name in keys)
        if not is_main():
            return None
        return {key: full[key].detach().to(device, dtype or full[key].dtype, copy=True) for key in keys}

    def full_specs(self, dtype: torch.dtype | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor ``full_state_dict`` returns, in its order, without gathering
        anything (under ZeRO-3 a parameter's full shape is its ``ds_shape``); any rank may call it."""
        tensors = dict(self.module.named_parameters(remove_duplicate=False))
        keys = list(self.module.state_dict().keys())
        tensors.update((name, buf) for name, buf in self.module.named_buffers() if name in keys)
        return [(key, str(dtype or tensors[key].dtype).removeprefix("torch."),
                 tuple(getattr(tensors[key], "ds_shape", tensors[key].shape))) for key in keys]

    def _full_param(self, param: torch.nn.Parameter) -> torch.Tensor:
        if self.backend == "ddp":
            return param.detach()
        from deepspeed.utils import safe_get_full_fp32_param

        fp32 = safe_get_full_fp32_param(param) if param.requires_grad else None
        if fp32 is not None:
            return fp32
        if hasattr(param, "ds_id"):  # a frozen ZeRO-3 parameter: gather the partitioned model copy
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                return param.detach().clone()
        return param.detach()


def _drop_hooks_of(module: torch.nn.Module, owner: object) -> None:
    """Remove from ``module`` and its children every hook that is a method or closure of ``owner``."""
    def owned(hook) -> bool:
        cells = getattr(hook, "__closure__", None) or ()
        return getattr(hook, "__self__", None) is owner or any(
            _cell_value(c) is owner for c in cells)

    for sub in module.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
            hooks = getattr(sub, attr, None)
            for key in [k for k, h in (hooks or {}).items() if owned(h)]:
                del hooks[key]


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients, clipping them to max_norm when max_norm > 0."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
