"""Active selection: rank unlabeled candidate pairs by how unsure the models are, keep the top k for annotators.

Uncertainty of a pair (a, b) of responses to one prompt, higher = more worth a human label:

    ensemble   disagreement of M reward models about the pair: std over models of their margins
               r_m(a) - r_m(b), each model's margins first divided by their spread over the candidates
               (separately trained RMs differ in scale; unscaled, the widest one would decide alone)
    margin     -|margin|: a margin near zero means the model cannot tell the responses apart. The margin
               is the DPO implicit reward difference beta * [(log pi - log pi_ref)(a) - (same)(b)] of a
               policy against its reference, or the (mean scaled) reward-model margin

Input records (JSON Lines etc., anything data.readers reads), one candidate each:
    {"prompt": ..., "responses": [a, b]}                  an unlabeled pair
    {"prompt": ..., "chosen": ..., "rejected": ...}       a pair whose labels are ignored (also HH full text)
    {"prompt": ...}                                       a prompt: two responses are sampled from a policy
Output rows: {"rank", "score", "prompt", "response_a", "response_b", "source", "margins"}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from unipipe_ray.data import DataError, parse_preference, parse_prompt
from unipipe_ray.data.readers import iter_raw

METHODS = ("ensemble", "margin")


@dataclass(frozen=True)
class Candidate:
    prompt: tuple[dict, ...]  # chat messages ending with a user turn
    response_a: str | None  # None until sampled (prompt-only records)
    response_b: str | None
    source: str  # file:line of the record
    meta: dict = field(default_factory=dict)


def _scaled(margins: np.ndarray) -> np.ndarray:
    """(M, N) margins divided by each model's std over the N candidates (1 where a model has no spread)."""
    spread = margins.std(axis=1, keepdims=True)
    return margins / np.where(spread > 0, spread, 1.0)


def ensemble_disagreement(margins) -> np.ndarray:
    """(M, N) margins of M >= 2 models -> (N,) std over models of the scaled margins."""
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 2 or margins.shape[0] < 2:
        raise ValueError(f"ensemble disagreement needs margins of >= 2 models as (M, N), got {margins.shape}")
    return _scaled(margins).std(axis=0, ddof=1)


def margin_uncertainty(margins) -> np.ndarray:
    """(N,) margins of one model, or (M, N) of several (their scaled mean) -> (N,) -|margin|."""
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim == 2:
        margins = _scaled(margins).mean(axis=0) if margins.shape[0] > 1 else margins[0]
    return -np.abs(margins)


def top_k(scores, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first; ties keep input order (a stable sort)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def parse_candidate(raw, loc: str) -> Candidate:
    """One input record -> Candidate; a bad record raises DataError naming ``loc`` (file:line)."""
    if isinstance(raw, dict) and "responses" in raw:
        responses = raw["responses"]
        if not (isinstance(responses, list) and len(responses) == 2
                and all(isinstance(r, str) and r.strip() for r in responses)):
            raise DataError("field 'responses': expected a list of two non-empty strings", "wrong_type", loc)
        if responses[0].strip() == responses[1].strip():
            raise DataError("the two responses are identical", "identical_pair", loc)
        p = parse_prompt({k: v for k, v in raw.items() if k != "responses"}, loc)
        return Candidate(p.prompt, responses[0], responses[1], loc, p.meta)
    if isinstance(raw, dict) and ("chosen" in raw or "rejected" in raw):
        pair = parse_preference(raw, loc)
        return Candidate(pair.prompt, pair.chosen, pair.rejected, loc, pair.meta)
    p = parse_prompt(raw, loc)
    return Candidate(p.prompt, None, None, loc, p.meta)


def read_candidates(path) -> list[Candidate]:
    """Every record of ``path`` as a Candidate; the first bad record stops with its file:line."""
    out = []
    for loc, raw in iter_raw(path):
        if isinstance(raw, DataError):
            raise raw
        out.append(parse_candidate(raw, loc))
    if not out:
        raise DataError("no candidate records", "no_records", str(path))
    return out


def sample_responses(candidates: Sequence[Candidate], policy: str, max_new_tokens: int = 128,
                     temperature: float = 1.0, seed: int = 0, max_prompt_length: int = 256) -> list[Candidate]:
    """Fill prompt-only candidates with two responses sampled from ``policy`` (the HF rollout engine).
    Pairs whose two samples decode to the same text are dropped: nobody can prefer one of them."""
    from unipipe_ray.core.models import load_tokenizer, resolve_model
    from unipipe_ray.data import tokenize_prompt
    from unipipe_ray.ppo.rollout import make_rollout_engine

    todo = [i for i, c in enumerate(candidates) if c.response_a is None]
    if not todo:
        return list(candidates)
    tokenizer = load_tokenizer(policy)
    prompts = [tokenize_prompt(candidates[i], tokenizer, max_prompt_length)["input_ids"] for i in todo]
    engine = make_rollout_engine("hf", resolve_model(policy), seed=seed)
    samples = engine.generate(prompts, 2, max_new_tokens, temperature)
    texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    out = list(candidates)
    for j, i in enumerate(todo):
        out[i] = replace(candidates[i], response_a=texts[2 * j], response_b=texts[2 * j + 1])
    return [c for c in out if c.response_a.strip() != c.response_b.strip()]


def rm_margins(candidates: Sequence[Candidate], reward_models: Sequence[str], max_length: int = 512,
               progress: bool = True) -> np.ndarray:
    """(M, N) margins r_m(a) - r_m(b) of each reward model on each candidate pair."""
    from unipipe_ray.eval.scoring import load_reward_model, reward_scores

    prompts = [c.prompt for c in candidates] * 2
    responses = [c.response_a for c in candidates] + [c.response_b for c in candidates]
    rows = []
    for path in reward_models:
        model, tokenizer = load_reward_model(path)
        scores = reward_scores(model, tokenizer, prompts, responses, max_length, progress=progress)
        rows.append(scores[:len(candidates)] - scores[len(candidates):])
    return np.stack(rows)


def implicit_margins(candidates: Sequence[Candidate], policy: str, ref: str, beta: float = 0.1,
                     max_length: int = 512, progress: bool = True) -> np.ndarray:
    """(1, N) DPO implicit-reward margins of ``policy`` against ``ref`` (scoring.implicit_rewards)."""
    from unipipe_ray.eval.scoring import implicit_rewards, load_policy

    pol, tokenizer = load_policy(policy)
    ref_model, _ = load_policy(ref)
    prompts = [c.prompt for c in candidates] * 2
    responses = [c.response_a for c in candidates] + [c.response_b for c in candidates]
    rewards = implicit_rewards(pol, ref_model, tokenizer, prompts, responses, beta, max_length, progress=progress)
    return (rewards[:len(candidates)] - rewards[len(candidates):])[None]


def ranked_rows(candidates: Sequence[Candidate], margins: np.ndarray, method: str, k: int) -> list[dict]:
    """The top-k candidates by uncertainty as output rows, rank 1 = most uncertain."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    scores = ensemble_disagreement(margins) if method == "ensemble" else margin_uncertainty(margins)
    rows = []
    for rank, i in enumerate(top_k(scores, k), 1):
        c = candidates[i]
        rows.append({"rank": rank, "score": float(scores[i]), "prompt": list(c.prompt), "response_a": c.response_a,
                     "response_b": c.response_b, "source": c.source, "margins": margins[:, i].tolist(),
                     **({"meta": c.meta} if c.meta else {})})
    return rows


def write_jsonl(rows: Sequence[dict], path) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept readable); parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
