"""Chat-format tokenization of SFT examples, preference pairs and generation prompts.

One sequence = chat_template(prompt, add_generation_prompt=True) + response tokens + EOS.
Without a chat template the prompt is "role: content\\n" per turn followed by "assistant: ".
The template only ever renders the prompt, so it cannot add an end-of-turn token after the response;
EOS is appended exactly once, and not at all when the response already ends with it.
labels = input_ids with the prompt positions set to -100 (the Hugging Face ignore index), same length.

Truncation, only when prompt + response exceeds max_length:
  1. drop tokens from the START of the prompt (the most recent context matters most for the reply),
     only as many as needed, but never below max_prompt_length (default max_length // 2) tokens;
  2. if still too long, cut the response at its end. A cut response has no EOS: the text did not end
     there, and an EOS would teach the model to stop mid-sentence;
  3. if no response token fits (only possible when max_prompt_length == max_length), raise DataError
     "empty_after_truncation" naming the example's source.
For pairs the prompt is cut once, for the longer response, so chosen and rejected share its tokens.
Generation prompts keep their last max_prompt_length tokens.
"""
from __future__ import annotations

import logging
from collections import Counter

from unipipe_ray.data.load import POLICIES, LoadReport
from unipipe_ray.data.records import DataError, PreferencePair, PromptExample, SFTExample

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_warned_no_template: set[str] = set()


def prompt_ids(messages, tokenizer) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant's generation header."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        # The template writes its special tokens as text; letting encode() add BOS would double it.
        return tokenizer.encode(text, add_special_tokens=False)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _warned_no_template:  # once per tokenizer: the prompt format differs from a chat model's
        _warned_no_template.add(name)
        log.warning("tokenizer %s has no chat template: prompts are rendered as 'role: content' lines ending "
                    "in 'assistant: '", name)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    # A distinct BOS (Llama style) belongs at the start; GPT-2 style tokenizers reuse EOS as BOS: skip those.
    return [bos] + ids if bos is not None and bos != tokenizer.eos_token_id else ids


def response_ids(text: str, tokenizer) -> list[int]:
    """Response tokens ending in exactly one EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set one before tokenizing")
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if ids and ids[-1] == eos else ids + [eos]


def tokenize_sft(ex: SFTExample, tokenizer, max_length: int, max_prompt_length: int | None = None,
                 cuts: Counter | None = None) -> dict:
    """-> {"input_ids": [T], "labels": [T]} with T <= max_length. ``cuts`` counts truncations (see _fit)."""
    limit = _prompt_limit(max_length, max_prompt_length)
    prompt, (response,) = _fit(prompt_ids(ex.prompt, tokenizer), [response_ids(ex.response, tokenizer)],
                               max_length, limit, ex.source, cuts)
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def tokenize_preference(pair: PreferencePair, tokenizer, max_length: int,
                        max_prompt_length: int | None = None, cuts: Counter | None = None) -> dict:
    """-> chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels; both rows share the prompt."""
    limit = _prompt_limit(max_length, max_prompt_length)
    responses = [response_ids(pair.chosen, tokenizer), response_ids(pair.rejected, tokenizer)]
    prompt, (chosen, rejected) = _fit(prompt_ids(pair.prompt, tokenizer), responses, max_length, limit,
                                      pair.source, cuts)
    if chosen == rejected:  # identical after cutting: the pair carries no preference signal
        raise DataError(f"chosen and rejected are identical after truncation to {max_length} tokens",
                        "identical_after_truncation", pair.source)
    masked = [IGNORE_INDEX] * len(prompt)
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": masked + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": masked + rejected}


def tokenize_prompt(ex: PromptExample, tokenizer, max_prompt_length: int, cuts: Counter | None = None) -> dict:
    """-> {"input_ids": [T]}, the last max_prompt_length tokens of the generation prompt."""
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    ids = prompt_ids(ex.prompt, tokenizer)
    if cuts is not None and len(ids) > max_prompt_length:
        cuts["prompt"] += 1
    return {"input_ids": ids[-max_prompt_length:]}


def tokenize_all(examples, kind: str, tokenizer, max_length: int, on_bad_record: str = "error",
                 report: LoadReport | None = None, *, max_prompt_length: int | None = None) -> list[dict]:
    """Tokenize a list of examples with the same error/skip policy as load_examples.

    Skipped examples are counted in `report` (pass load_examples' report to get one summary). For
    kind="prompt" the prompt limit is max_prompt_length, default max_length // 2 as for the other kinds.
    """
    if on_bad_record not in POLICIES:
        raise ValueError(f"unknown on_bad_record {on_bad_record!r}; expected one of: {', '.join(POLICIES)}")
    limit = _prompt_limit(max_length, max_prompt_length)
    cuts: Counter = Counter()
    one = {"sft": lambda ex: tokenize_sft(ex, tokenizer, max_length, limit, cuts),
           "preference": lambda ex: tokenize_preference(ex, tokenizer, max_length, limit, cuts),
           "prompt": lambda ex: tokenize_prompt(ex, tokenizer, limit, cuts)}
    if kind not in one:
        raise ValueError(f"unknown kind {kind!r}; expected one of: {', '.join(one)}")
    report = report if report is not None else LoadReport(total=len(examples))
    skipped_before, features = report.skipped, []
    for ex in examples:
        try:
            features.append(one[kind](ex))
        except DataError as e:
            if on_bad_record == "error":
                raise
            report.skip(e)
    if report.skipped > skipped_before:
        log.warning("tokenize_all(%s): %s", kind, report.summary())
    # inputs changed on the way in: say how many, so a user can raise max_length if it matters (the counters
    # also hold zeros for examples that kept everything)
    if cuts["prompt"] or cuts["response"]:
        log.warning("tokenize_all(%s): of %d examples, %d prompts lost their earliest tokens (a system turn or "
                    "early dialogue may be gone; prompt limit %d tokens) and %d responses were cut at their end "
                    "(max_length %d)", kind, len(examples), cuts["prompt"], limit, cuts["response"], max_length)
    if examples and not features:
        raise DataError(f"no example left after tokenization ({report.summary()})", "no_records")
    return features


def _prompt_limit(max_length: int, max_prompt_length: int | None) -> int:
    limit = max_length // 2 if max_prompt_length is None else max_prompt_length
    if max_length < 2 or not 1 <= limit <= max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= max_prompt_length <= max_length, got "
                         f"max_length={max_length}, max_prompt_length={max_prompt_length}")
    return limit


def _fit(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int, source: str,
         cuts: Counter | None = None):
    """Apply the module's truncation policy; returns (prompt, responses). ``cuts["prompt"]`` and
    ``cuts["response"]`` count the examples whose prompt start or response end was cut."""
    excess = len(prompt) + max(map(len, responses)) - max_length
    cut_prompt = False
    if excess > 0:
        keep = max(len(prompt) - excess, min(len(prompt), max_prompt_length))
        cut_prompt = keep < len(prompt)
        prompt = prompt[len(prompt) - keep:]
    room = max_length - len(prompt)
    if room < 1:
        raise DataError(f"no response token fits: the prompt keeps {len(prompt)} of max_length {max_length} "
                        f"tokens (max_prompt_length={max_prompt_length})", "empty_after_truncation", source)
    if cuts is not None:
        cuts["prompt"] += cut_prompt
        cuts["response"] += any(len(r) > room for r in responses)
    return prompt, [r[:room] for r in responses]
