"""The TrainingEngine facade: DDP and DeepSpeed ZeRO 1-3 give the update of plain full-batch AdamW; resume is exact.

Multi-rank cases run 2 processes over gloo (torch.multiprocessing spawn, DeepSpeed on its CPU accelerator).
Each configuration runs once per session and several tests read its record. The model is a tiny Llama
with tied embeddings built in-process, so ZeRO-3's shared-parameter handling is exercised too.
"""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.floors import GRAD_NORM_RTOL, LOSS_ATOL, assert_same_update
from unipipe_ray.runtime import distributed as ud
from unipipe_ray.runtime import engine as ue

VOCAB, SEQ, GLOBAL_BATCH, STEPS, TOTAL_STEPS, WARMUP = 128, 12, 8, 4, 6, 2
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-2, 0.1, 0.5
RESUME_AFTER = 2


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).float()


def step_data():
    """(STEPS, GLOBAL_BATCH, SEQ) token ids: the same global batches for every configuration."""
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def token_loss(model, ids, normalizer):
    """Next-token NLL summed over the micro-batch / normalizer (global token count / world, as in the stages)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum") / normalizer


def reference_run():
    """Plain single-process AdamW on the full global batch: what every engine configuration must match."""
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: ue.warmup_cosine(s, WARMUP, TOTAL_STEPS))
    record = {"loss": [], "grad_norm": [], "lr": []}
    for ids in step_data():
        loss = token_loss(model, ids, ids[:, 1:].numel())
        loss.backward()
        record["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)))
        record["lr"].append(scheduler.get_last_lr()[0])
        record["loss"].append(loss.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    record["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return record


def train(engine, rank, world, grad_accum, steps, record, probe=None):
    """The stage loop in miniature: this rank's share of each global batch, in grad_accum micro-batches."""
    data = step_data()
    for step in steps:
        shard = data[step].chunk(world)[rank]
        normalizer = GLOBAL_BATCH * (SEQ - 1) / world
        step_loss = 0.0
        for micro, ids in enumerate(shard.chunk(grad_accum)):
            loss = token_loss(engine, ids, normalizer)
            engine.backward(loss)
            step_loss += float(loss.detach())
            if probe:
                probe(micro)
        info = engine.step()
        record["loss"].append(float(ud.all_reduce_mean(step_loss)))
        record["grad_norm"].append(info["grad_norm"])
        record["lr"].append(info["lr"])


def make_engine(model, spec):
    return ue.TrainingEngine(model, LR, WEIGHT_DECAY, MAX_GRAD_NORM, TOTAL_STEPS, warmup_steps=WARMUP,
                             grad_accum=spec["grad_accum"], backend=spec["backend"],
                             zero_stage=spec.get("zero_stage", 0), offload_optimizer=spec.get("offload", False),
                             bf16=spec.get("bf16", False))


def count_allreduces(engine, record):
    """Record, per micro-batch, how many DDP bucket all-reduces its backward launched."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = [0]

    def hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(None, bucket)

    engine.model.register_comm_hook(None, hook)
    record["allreduces"] = []

    def probe(micro):
        record["allreduces"].append((micro, calls[0]))
        calls[0] = 0

    return probe


def worker(rank, world, port, spec, out_dir):
    """One rank: train STEPS steps (saving state after RESUME_AFTER), then optionally resume a fresh engine.

    world 1 starts no process group: the facade must then set DeepSpeed up alone.
    """
    torch.set_num_threads(1)
    os.environ["DS_ACCELERATOR"] = "cpu"
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    if spec.get("zero_stage") == 3:
        # ZeRO-3 keeps parameters under 1e5 elements whole on every rank: partition all of this tiny model
        config = ue.deepspeed_config
        ue.deepspeed_config = lambda *a: {**config(*a), "zero_optimization": {
            **config(*a)["zero_optimization"], "stage3_param_persistence_threshold": 0}}
    record = {"loss": [], "grad_norm": [], "lr": []}
    engine = make_engine(tiny_llama(), spec)
    probe = count_allreduces(engine, record) if spec["backend"] == "ddp" else None
    train(engine, rank, world, spec["grad_accum"], range(RESUME_AFTER), record, probe)
    state_dir, weights = os.path.join(out_dir, "state"), engine.full_state_dict()
    engine.save_state(state_dir)
    if rank == 0:
        torch.save(weights, os.path.join(out_dir, "weights.pt"))
    train(engine, rank, world, spec["grad_accum"], range(RESUME_AFTER, STEPS), record, probe)
    record["weights"] = engine.full_state_dict()
    record["module_numel"] = sum(p.numel() for p in engine.module.parameters())
    if spec.get("resume"):
        torch.distributed.barrier()  # weights.pt is written
        model = tiny_llama(seed=123)  # a different init: everything must come from the saved state
        model.load_state_dict(torch.load(os.path.join(out_dir, "weights.pt"), weights_only=True))
        resumed = {"loss": [], "grad_norm": [], "lr": []}
        fresh = make_engine(model, spec)
        fresh.load_state(state_dir)
        train(fresh, rank, world, spec["grad_accum"], range(RESUME_AFTER, STEPS), resumed)
        resumed["weights"] = fresh.full_state_dict()
        record["resumed"] = resumed
        fresh.close()
        del fresh
    engine.close()
    del engine, probe
    record["teardown"] = teardown()
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))


def teardown() -> dict:
    """Shut the process group down as the facade does, and report what would be freed only at finalization.

    torch's destroy_process_group does not stop gloo's threads: they stop when the last reference to the
    group goes. A group still referenced from a module global (DeepSpeed keeps the world group in one) is
    released only while the interpreter finalizes, and tearing gloo down then can abort the rank at exit
    ('terminate called without an active exception'). No module global may hold a group afterwards.
    """
    import gc

    ud.shutdown()
    gc.collect()
    held = sorted(f"{module}.{name}" for module, name, value in module_globals()
                  if isinstance(value, torch.distributed.ProcessGroup))
    return {"process_group_initialized": torch.distributed.is_initialized(), "groups_in_module_globals": held}


def module_globals():
    """(module, name, value) for every module-level global, and the items of global dicts/lists/tuples."""
    import sys

    for module_name, module in list(sys.modules.items()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            yield module_name, name, value
            if type(value) is dict:  # exact types: lazy mappings (transformers) import on access
                yield from ((module_name, name, v) for v in list(value.values()))
            elif type(value) in (list, tuple):
                yield from ((module_name, name, v) for v in list(value))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SPECS = {
    "ddp": {"backend": "ddp", "grad_accum": 2, "resume": True},
    "zero0": {"backend": "deepspeed", "zero_stage": 0, "grad_accum": 2},
    "zero1": {"backend": "deepspeed", "zero_stage": 1, "grad_accum": 2},
    "zero2": {"backend": "deepspeed", "zero_stage": 2, "grad_accum": 2, "resume": True},
    "zero3": {"backend": "deepspeed", "zero_stage": 3, "grad_accum": 2},
    "zero3_offload": {"backend": "deepspeed", "zero_stage": 3, "grad_accum": 2, "offload": True},
    "bf16_one_process": {"backend": "deepspeed", "zero_stage": 1, "grad_accum": 1, "bf16": True, "world": 1},
}


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return reference_run()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run each configuration once, on first use (2 ranks unless it says); returns its per-rank records."""
    cache = {}

    def get(name):
        if name not in cache:
            out_dir = str(tmp_path_factory.mktemp(name))
            world = SPECS[name].get("world", 2)
            mp.spawn(worker, args=(world, free_port(), SPECS[name], out_dir), nprocs=world, join=True)
            cache[name] = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]
        assert_clean_teardown(cache[name])  # mp.spawn itself raises if a rank died (e.g. SIGABRT at exit)
        return cache[name]

    return get


CLEAN = {"process_group_initialized": False, "groups_in_module_globals": []}


def assert_clean_teardown(records):
    for rank, record in enumerate(records):
        assert record["teardown"] == CLEAN, f"rank {rank}: {record['teardown']}"


def assert_matches(record, reference):
    """The same training up to float32 summation order (micro-batching, all-reduce, ZeRO buckets), which Adam
    amplifies; tolerances and the floors they were fitted to are in tests/floors.py."""
    assert record["lr"] == pytest.approx(reference["lr"], rel=1e-12)
    assert record["loss"] == pytest.approx(reference["loss"], abs=LOSS_ATOL)
    assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=GRAD_NORM_RTOL)
    assert_same_update(record["weights"], reference["weights"], tiny_llama().state_dict())


@pytest.mark.timeout(120)
def test_ddp_with_accumulation_matches_full_batch_adamw(runs, reference):
    """2 ranks x 2 micro-batches of 2 == one batch of 8, and only the last micro-batch all-reduces."""
    rank0, rank1 = runs("ddp")
    assert_matches(rank0, reference)
    assert rank1["weights"] is None
    for micro, calls in rank0["allreduces"]:
        assert (calls > 0) == (micro == 1), rank0["allreduces"]


@pytest.mark.timeout(150)  # the first DeepSpeed run JIT-builds its shared-memory comm op (~30 s, then cached)
@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_deepspeed_zero_matches_full_batch_adamw(runs, reference, name):
    rank0, _ = runs(name)
    assert_matches(rank0, reference)


@pytest.mark.timeout(150)
def test_zero3_full_state_dict_gathers_partitioned_weights(runs, reference):
    rank0, rank1 = runs("zero3")
    assert rank0["module_numel"] == 0  # the module itself holds only placeholders under ZeRO-3
    assert rank1["weights"] is None
    assert all(v.dtype == torch.float32 for v in rank0["weights"].values())
    # the tied head is returned under both names, as save_pretrained expects
    assert torch.equal(rank0["weights"]["lm_head.weight"], rank0["weights"]["model.embed_tokens.weight"])
    assert_matches(rank0, reference)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_resume_from_saved_state_is_exact(runs, name):
    """Train 2, save, train 2 == a fresh engine (other init) that loads weights + state, then trains 2."""
    for record in runs(name):
        resumed = record["resumed"]
        assert resumed["lr"] == record["lr"][RESUME_AFTER:]  # the schedule resumed, not restarted
        assert resumed["loss"] == record["loss"][RESUME_AFTER:]
        if record["weights"] is not None:
            for key, value in record["weights"].items():
                assert torch.equal(resumed["weights"][key], value), key


@pytest.mark.timeout(400)  # the first use JIT-builds DeepSpeed's CPU Adam (45-110 s here, then cached)
def test_zero3_with_optimizer_offload_matches_full_batch_adamw(runs, reference):
    """Offload takes DeepSpeed's CPU Adam (it refuses a torch optimizer there); same update as AdamW."""
    rank0, _ = runs("zero3_offload")
    assert_matches(rank0, reference)


@pytest.mark.timeout(150)
def test_deepspeed_bf16_steps_on_cpu_without_a_process_group(runs, reference):
    (rank0,) = runs("bf16_one_process")
    assert all(math.isfinite(x) for x in rank0["loss"] + rank0["grad_norm"])
    assert rank0["loss"] == pytest.approx(reference["loss"], abs=0.01)  # the same run, at bf16 precision
    assert all(v.dtype == torch.float32 for v in rank0["weights"].values())  # the fp32 master weights
    init = tiny_llama().state_dict()
    assert all(not torch.allclose(rank0["weights"][k], v, atol=1e-4) for k, v in init.items() if v.ndim > 1)


@pytest.mark.timeout(60)
def test_grad_accumulation_4x2_equals_1x8():
    """One process: 4 micro-batches of 2 give the update of one batch of 8 (losses normalised per step)."""
    torch.set_num_threads(1)
    records = []
    for grad_accum in (4, 1):
        engine = make_engine(tiny_llama(), {"backend": "ddp", "grad_accum": grad_accum})
        records.append({"loss": [], "grad_norm": [], "lr": []})
        train(engine, 0, 1, grad_accum, range(2), records[-1])
        records[-1]["weights"] = engine.full_state_dict()
    assert_matches(*records)


@pytest.mark.timeout(30)
def test_engine_options_outside_ddp_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="backend"):
        ue.TrainingEngine(model, LR, 0.0, 1.0, 1, 0, backend="fsdp")
    with pytest.raises(ValueError, match="deepspeed"):
        ue.TrainingEngine(model, LR, 0.0, 1.0, 1, 0, zero_stage=2)
    with pytest.raises(ValueError, match="deepspeed"):
        ue.TrainingEngine(model, LR, 0.0, 1.0, 1, 0, offload_optimizer=True)
    assert ue.TrainingEngine(model, LR, 0.0, 1.0, 1, 0, bf16=True).module.dtype == torch.bfloat16  # DDP in plain bf16
