"""Typed records (SFT example, preference pair, prompt) and the checks that turn raw dicts into them.

A prompt is always a tuple of chat messages {"role", "content"} ending with a user turn. Accepted inputs:

    SFT         {"prompt": str | messages, "response": str}  or  {"messages": [..., assistant turn]}
    preference  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                {"chosen": dialogue, "rejected": dialogue}  (HH-RLHF: full-text dialogues
                "\\n\\nHuman: ...\\n\\nAssistant: ..." or full message lists; everything before
                the final assistant turn is the prompt, and must be the same in both)
    prompt      {"prompt": str | messages}  or  {"messages": [...]}

All three take an optional "system" string; every other field goes into `meta` (e.g. GSM8K's "answer").
Every problem raises DataError naming the record's location and a short `kind` for skip reports.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad record or file. `kind` is a short tag counted in skip reports ("missing_field", "wrong_type",
    "identical_pair", ...); `loc` says where: `train.jsonl:12` (line, 1-based) or `dir[record 7]`
    (0-based)."""

    def __init__(self, message: str, kind: str, loc: str | None = None):
        super().__init__(f"{loc}: {message} [{kind}]" if loc else f"{message} [{kind}]")
        self.message, self.kind, self.loc = message, kind, loc

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling; rebuild from the parts, not the joined text.
        return (type(self), (self.message, self.kind, self.loc))


@dataclass(frozen=True)
class SFTExample:
    prompt: tuple[dict, ...]  # chat messages {"role", "content"}, ending with a user turn
    response: str  # the assistant reply that is trained on
    source: str  # where the record came from, e.g. "train.jsonl:12"
    meta: dict = field(default_factory=dict)  # the raw record's other fields (e.g. "answer")


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[dict, ...]  # shared by both responses
    chosen: str
    rejected: str
    source: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromptExample:
    prompt: tuple[dict, ...]
    source: str
    meta: dict = field(default_factory=dict)


def parse_sft(raw, loc: str) -> SFTExample:
    raw = _object(raw, loc)
    if "messages" in raw:
        conversation = _messages(raw["messages"], "messages", loc)
    else:
        prompt = _prompt(_require(raw, "prompt", loc, alternative="messages"), "prompt", loc)
        response = _text(_require(raw, "response", loc), "response", loc)
        conversation = prompt + ({"role": "assistant", "content": response},)
    prompt, response = _split_response(_with_system(conversation, raw, loc), "messages", loc)
    return SFTExample(prompt, response, loc, _meta(raw, "messages", "prompt", "response", "system"))


def parse_preference(raw, loc: str) -> PreferencePair:
    raw = _object(raw, loc)
    prompt, chosen = _split_response(_conversation(raw, "chosen", loc), "chosen", loc)
    rejected_prompt, rejected = _split_response(_conversation(raw, "rejected", loc), "rejected", loc)
    if prompt != rejected_prompt:
        pairs = zip(prompt, rejected_prompt, strict=False)
        differ = [i for i, (a, b) in enumerate(pairs) if a != b]
        where = f"first differing turn: {differ[0]}" if differ else (
            f"{len(prompt)} vs {len(rejected_prompt)} turns")
        raise DataError(f"'chosen' and 'rejected' do not share the prompt before their final assistant turn "
                        f"({where})", "prompt_mismatch", loc)
    if chosen.strip() == rejected.strip():
        raise DataError("'chosen' and 'rejected' responses are identical", "identical_pair", loc)
    return PreferencePair(prompt, chosen, rejected, loc, _meta(raw, "prompt", "chosen", "rejected", "system"))


def parse_prompt(raw, loc: str) -> PromptExample:
    raw = _object(raw, loc)
    name = "prompt" if "prompt" in raw or "messages" not in raw else "messages"
    prompt = _with_system(_prompt(_require(raw, name, loc, alternative="messages"), name, loc), raw, loc)
    _check_prompt(prompt, name, loc)
    return PromptExample(prompt, loc, _meta(raw, "prompt", "messages", "system"))


_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_dialogue(text: str, name: str, loc: str) -> tuple[dict, ...]:
    """HH-RLHF full text "\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages (turn text stripped)."""
    if text.startswith(("Human:", "Assistant:")):  # a few dumps drop the leading blank line
        text = "\n\n" + text
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"field '{name}': not a dialogue of '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns",
                        "malformed_dialogue", loc)
    return tuple({"role": _HH_ROLES[role], "content": content.strip()}
                 for role, content in zip(parts[1::2], parts[2::2], strict=True))


def _conversation(raw: dict, name: str, loc: str) -> tuple[dict, ...]:
    """The full conversation ending in the `name` response, prompt included."""
    value = _require(raw, name, loc)
    if "prompt" in raw:
        prompt = _prompt(raw["prompt"], "prompt", loc)
        if isinstance(value, str):
            return _with_system(prompt + ({"role": "assistant", "content": value},), raw, loc)
        return _with_system(prompt + _messages(value, name, loc), raw, loc)
    if isinstance(value, str):
        return _with_system(split_dialogue(value, name, loc), raw, loc)
    return _with_system(_messages(value, name, loc), raw, loc)


def _split_response(conversation: tuple[dict, ...], name: str, loc: str) -> tuple[tuple[dict, ...], str]:
    last = conversation[-1]
    if last["role"] != "assistant":
        raise DataError(f"field '{name}': the last turn must be the assistant's response, got role "
                        f"'{last['role']}'", "wrong_role", loc)
    if not last["content"].strip():
        raise DataError(f"field '{name}': the assistant response is empty", "empty_field", loc)
    prompt = conversation[:-1]
    _check_prompt(prompt, name, loc)
    return prompt, last["content"]


def _check_prompt(prompt: tuple[dict, ...], name: str, loc: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        got = f"role '{prompt[-1]['role']}'" if prompt else "no turns"
        raise DataError(f"field '{name}': the prompt must end with a user turn, got {got}", "wrong_role", loc)
    if not prompt[-1]["content"].strip():
        raise DataError(f"field '{name}': the last user turn is empty", "empty_field", loc)


def _prompt(value, name: str, loc: str) -> tuple[dict, ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": _text(value, name, loc)},)
    return _messages(value, name, loc)


def _messages(value, name: str, loc: str) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise DataError(f"field '{name}': expected str or list of messages, got {type(value).__name__}",
                        "wrong_type", loc)
    if not value:
        raise DataError(f"field '{name}' is an empty list", "empty_field", loc)
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"field '{where}': expected a message object, got {type(message).__name__}",
                            "wrong_type", loc)
        role, content = _require(message, "role", loc, where), _require(message, "content", loc, where)
        if role not in ROLES:
            raise DataError(f"field '{where}': unknown role {role!r} (expected one of {', '.join(ROLES)})",
                            "unknown_role", loc)
        if not isinstance(content, str):
            raise DataError(f"field '{where}.content': expected str, got {type(content).__name__}",
                            "wrong_type", loc)
        out.append({"role": role, "content": content})
    return tuple(out)


def _with_system(conversation: tuple[dict, ...], raw: dict, loc: str) -> tuple[dict, ...]:
    if "system" not in raw:
        return conversation
    if conversation[0]["role"] == "system":
        raise DataError("both a 'system' field and a system message", "conflicting_field", loc)
    return ({"role": "system", "content": _text(raw["system"], "system", loc)},) + conversation


def _object(raw, loc: str) -> dict:
    if not isinstance(raw, dict):
        raise DataError(f"record: expected a JSON object, got {type(raw).__name__}", "wrong_type", loc)
    return raw


def _require(raw: dict, key: str, loc: str, where: str | None = None, alternative: str | None = None):
    if key in raw:
        return raw[key]
    name = f"'{key}'" + (f" (or '{alternative}')" if alternative else "")
    inside = f" in '{where}'" if where else f" (fields present: {', '.join(sorted(map(str, raw))) or 'none'})"
    raise DataError(f"missing field {name}{inside}", "missing_field", loc)


def _text(value, name: str, loc: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"field '{name}': expected str, got {type(value).__name__}", "wrong_type", loc)
    if not value.strip():
        raise DataError(f"field '{name}' is empty", "empty_field", loc)
    return value


def _meta(raw: dict, *used: str) -> dict:
    return {k: v for k, v in raw.items() if k not in used}
