"""Reading configs: YAML files and dotted overrides into frozen dataclasses, with errors that name the file
and the dotted key. ``config.py`` holds the dataclasses; this module knows nothing about them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.message, self.source = key, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check/convert a YAML value against a field's annotation (dataclasses, tuples, optionals, scalars)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if _is_dataclass_type(tp):
        return _build(tp, value, key)
    if origin is dict:  # free-form mapping (a search space): its owner's __post_init__ checks the entries
        _check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {type(value).__name__}")
        item_tp = typing.get_args(tp)[0]
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    _check(isinstance(value, tp) and not (tp is int and isinstance(value, bool)), key,
           f"must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    dotted = (prefix + ".") if prefix else ""
    if data is None:
        data = {}
    _check(isinstance(data, dict), prefix, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(dotted + str(unknown[0]), f"unknown key (known keys: {', '.join(names)})")
    kwargs = {k: _coerce(hints[k], v, dotted + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # raised by __post_init__ with the bare field name: give it the full path
        raise ConfigError(dotted + e.key, e.message) from None
    except ValueError as e:  # a component's own validation (e.g. SamsSettings): name the section
        raise ConfigError(prefix, str(e)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        _check(isinstance(node, dict), dotted, f"cannot set a key below {p!r}, which is not a mapping")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-5`` -> ("train.lr", 1e-05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Read a YAML file (optional) into ``cls``, apply dotted overrides, validate. Errors name the file."""
    source = str(path) if path else "<defaults>"
    tree: dict = {}
    if path:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError("", f"invalid YAML: {e}", source) from None
        if not isinstance(tree, dict):
            raise ConfigError("", f"top level must be a mapping, got {type(tree).__name__}", source)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    try:
        return _build(cls, tree)
    except ConfigError as e:
        raise ConfigError(e.key, e.message, source) from None


def to_dict(config: Any) -> dict:
    """Plain dict (tuples as lists) for YAML/JSON dumps and manifests."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))
