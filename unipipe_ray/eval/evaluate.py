"""Evaluate a model on held-out examples: every figure an entry (eval/summary.py) with a bootstrap interval.

    completions = generate_completions(model, examples)                     greedy answers
    evaluate_generations(completions, examples, task)                       exact match (task checker), BLEU,
                                                                            chrF, ROUGE-1/2/L, token F1
    preference_accuracy_of_rm(reward_model, pairs)                          RM ranks chosen above rejected
    implicit_reward_accuracy(policy, ref, pairs, beta)                      the same for DPO's implicit reward
    win_rate_of(examples, completions_a, completions_b, judge)              A beats B per prompt (RM or gold)
    evaluate_model(model, task, examples, pairs=..., ...)                   all of the above that apply

Models are given as paths / model specs (models.resolve_model). Examples are anything with ``.prompt``
(chat messages) and ``.meta``; references come from ``.response`` (SFT examples) or ``meta["solution"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unipipe_ray.eval import metrics, stats
from unipipe_ray.eval.summary import corpus_bleu_entry, entry


def generate_completions(model_path: str, examples: Sequence, max_new_tokens: int = 128, batch_size: int = 64,
                         max_prompt_length: int = 256, engine: str = "hf", progress: bool = True,
                         dtype: str = "float32") -> list[str]:
    """Greedy completions of the examples' prompts through the rollout engine (ppo/rollout.py): "hf"
    (our decode loop, runs anywhere) or "vllm" (needs vLLM installed), with weights in ``dtype``."""
    from tqdm import tqdm

    from unipipe_ray.core.models import load_tokenizer, resolve_model
    from unipipe_ray.data import tokenize_prompt
    from unipipe_ray.ppo.rollout import make_rollout_engine

    if engine not in ("hf", "vllm"):
        raise ValueError(f"unknown engine {engine!r}; expected hf or vllm")
    tokenizer = load_tokenizer(model_path)
    prompts = [tokenize_prompt(ex, tokenizer, max_prompt_length)["input_ids"] for ex in examples]
    runner = make_rollout_engine(engine, str(resolve_model(model_path)), dtype=dtype)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        samples = runner.generate(prompts[i:i + batch_size], 1, max_new_tokens, temperature=0.0)
        out.extend(tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples)
    return out


def references_of(examples: Sequence) -> list[str] | None:
    """Reference responses of the examples, or None when any example has none."""
    refs = [getattr(ex, "response", None) or ex.meta.get("solution") for ex in examples]
    return None if any(r is None for r in refs) else refs


def evaluate_generations(completions: Sequence[str], examples: Sequence, task=None, n_resamples: int = 2000,
                         seed: int = 0) -> dict:
    """{metric: entry}: exact_match (the task's gold checker, when it has one), and against the reference
    responses: token_f1, sentence_bleu, chrf (sentence chrF), rouge1/rouge2/rougeL (per example, in [0, 1]
    except BLEU/chrF in 0-100), plus corpus bleu (no per-example scores)."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
    kw = dict(n_resamples=n_resamples, seed=seed)
    out = {}
    if task is not None and getattr(task, "has_gold_reward", False):
        out["exact_match"] = entry([task.gold_reward(ex, c) for ex, c in zip(examples, completions, strict=True)],
                                   binary=True, **kw)
    refs = references_of(examples)
    if refs is None:
        return out
    out["token_f1"] = entry(metrics.token_f1_scores(completions, refs), **kw)
    out["bleu"] = corpus_bleu_entry(completions, refs, **kw)
    out["sentence_bleu"] = entry(metrics.sentence_bleu_scores(completions, refs), **kw)
    out["chrf"] = entry(metrics.sentence_chrf_scores(completions, refs), **kw)
    for key, scores in metrics.rouge_scores(completions, refs).items():
        out[key] = entry(scores, **kw)
    return out


def _pair_columns(pairs: Sequence) -> tuple[list, list[str]]:
    """(prompts, responses) of 2N rows: the N chosen responses, then the N rejected ones."""
    return [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]


def _accuracy_entry(scores: np.ndarray, n: int, **kw) -> dict:
    chosen, rejected = scores[:n], scores[n:]
    return entry(metrics.preference_accuracy(chosen, rejected), margin_mean=float(np.mean(chosen - rejected)), **kw)


def preference_accuracy_of_rm(reward_model: str, pairs: Sequence, max_length: int = 512, batch_size: int = 16,
                              n_resamples: int = 2000, seed: int = 0, progress: bool = True) -> dict:
    """Entry: share of pairs whose chosen response the reward model scores above the rejected (ties 0.5),
    plus margin_mean (mean chosen - rejected score)."""
    from unipipe_ray.eval.scoring import load_reward_model, reward_scores

    model, tokenizer = load_reward_model(reward_model)
    prompts, responses = _pair_columns(pairs)
    scores = reward_scores(model, tokenizer, prompts, responses, max_length, batch_size, progress)
    return _accuracy_entry(scores, len(pairs), n_resamples=n_resamples, seed=seed)


def implicit_reward_accuracy(policy: str, ref: str, pairs: Sequence, beta: float = 0.1, max_length: int = 512,
                             batch_size: int = 8, n_resamples: int = 2000, seed: int = 0,
                             progress: bool = True) -> dict:
    """Entry: preference accuracy of the DPO implicit reward beta * (log pi - log pi_ref) of ``policy``
    against the reference model ``ref``; margin_mean in the same units (beta-scaled nats)."""
    from unipipe_ray.eval.scoring import implicit_rewards, load_policy

    pol_model, tokenizer = load_policy(policy)
    ref_model, _ = load_policy(ref)
    prompts, responses = _pair_columns(pairs)
    scores = implicit_rewards(pol_model, ref_model, tokenizer, prompts, responses, beta, max_length, batch_size,
                              progress)
    return _accuracy_entry(scores, len(pairs), n_resamples=n_resamples, seed=seed)


def judge_scores(examples: Sequence, completions: Sequence[str], reward_model: str | None = None, task=None,
                 max_length: int = 512, progress: bool = True) -> np.ndarray:
    """(N,) judge scores of completions: the reward model's when given, else the task's gold reward."""
    if reward_model is not None:
        from unipipe_ray.eval.scoring import load_reward_model, reward_scores

        model, tokenizer = load_reward_model(reward_model)
        return reward_scores(model, tokenizer, [ex.prompt for ex in examples], completions, max_length,
                             progress=progress)
    if task is None or not getattr(task, "has_gold_reward", False):
        raise ValueError("a win rate needs a judge: a reward model, or a task with a gold checker")
    return np.array([task.gold_reward(ex, c) for ex, c in zip(examples, completions, strict=True)], dtype=float)


def win_rate_of(scores_a: Sequence[float], scores_b: Sequence[float], n_resamples: int = 2000,
                seed: int = 0) -> dict:
    """Entry: A's win rate over B per prompt (ties 0.5) from the judge's scores, plus the sign test of
    H0 "A and B win equally often" (wins, losses, ties, p_value; ties dropped)."""
    test = stats.sign_test(scores_b, scores_a)  # sign_test counts wins of its second argument
    return entry(metrics.win_rate(scores_a, scores_b), n_resamples=n_resamples, seed=seed, **test)


def evaluate_model(model_path: str, task, examples: Sequence, *, pairs: Sequence | None = None,
                   reward_model: str | None = None, ref_model: str | None = None, beta: float = 0.1,
                   completions: Sequence[str] | None = None, max_new_tokens: int = 128, max_length: int = 512,
                   n_resamples: int = 2000, seed: int = 0, progress: bool = True,
                   dtype: str = "float32") -> dict:
    """{metric: entry} for one model on held-out ``examples`` (and ``pairs``), as the pipeline report wants.

    Generates greedily (weights in ``dtype``) unless ``completions`` are given; then evaluate_generations.
    With ``reward_model``: rm_score (the RM's mean score of the completions) and, with pairs, rm_accuracy.
    With ``ref_model`` and pairs: implicit_accuracy of this model as a DPO policy against ``ref_model``.
    """
    if completions is None:
        completions = generate_completions(model_path, examples, max_new_tokens, progress=progress, dtype=dtype)
    kw = dict(n_resamples=n_resamples, seed=seed)
    out = evaluate_generations(completions, examples, task, **kw)
    if reward_model is not None:
        out["rm_score"] = entry(judge_scores(examples, completions, reward_model, max_length=max_length,
                                             progress=progress), **kw)
        if pairs:
            out["rm_accuracy"] = preference_accuracy_of_rm(reward_model, pairs, max_length, progress=progress, **kw)
    if ref_model is not None and pairs:
        out["implicit_accuracy"] = implicit_reward_accuracy(model_path, ref_model, pairs, beta, max_length,
                                                            progress=progress, **kw)
    return out
