"""Reading configs: YAML files and dotted overrides into frozen dataclasses, with errors that name the file
and the dotted key. schema.py holds the dataclasses; this module knows nothing about them.

The public API (re-exported by ``unipipe_ray.config``):

    load_config(cls, path, overrides)            -> the frozen config
    load_config_with_keys(cls, path, overrides)  -> (the config, the dotted keys the user set), one read
    given_keys(path, overrides)                  -> the dotted keys the user set
    build_config(cls, tree)                      -> a config from a plain tree (``to_dict``'s shape)
    set_dotted(tree, "train.lr", 1e-5)           -> set a dotted key in such a tree
    check(ok, key, message) / one_of(value, key, choices)   validators for a config's ``__post_init__``
    config_differences(old, new), to_dict(config), parse_override(text), read_yaml(path)

A config class may define a static ``normalise_tree(mapping) -> mapping``: ``build_config`` runs it on the
class's raw mapping first (TuneConfig flattens its search space there, so the dataclass stays frozen).
"""

from __future__ import annotations

import dataclasses
import math
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


def check(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless ``ok`` (the field name as key: the reader adds the section)."""
    if not ok:
        raise ConfigError(key, message)


def one_of(value: Any, key: str, choices: tuple) -> None:
    check(value in choices, key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


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
        if len(inner) == 1:
            return _coerce(inner[0], value, key)
        for tp_ in inner:  # e.g. bool | str: the first type the value is
            try:
                return _coerce(tp_, value, key)
            except ConfigError:
                pass
        names = " or ".join(getattr(t, "__name__", str(t)) for t in inner)
        raise ConfigError(key, f"must be {names}, got {type(value).__name__} {value!r}")
    if _is_dataclass_type(tp):
        return _build(tp, value, key)
    if origin is dict:  # free-form mapping (a search space): its owner's __post_init__ checks the entries
        check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is tuple:
        check(isinstance(value, (list, tuple)), key, f"must be a list, got {type(value).__name__}")
        item_tp = typing.get_args(tp)[0]
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float):
        # No key means "infinite" or "not a number": .inf epochs would pass every range check and then
        # fail in each Ray Train attempt, a NaN weight would train NaN weights.
        check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
    check(isinstance(value, tp) and not (tp is int and isinstance(value, bool)), key,
           f"must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    dotted = (prefix + ".") if prefix else ""
    if data is None:
        data = {}
    check(isinstance(data, dict), prefix, f"must be a mapping, got {type(data).__name__}")
    normalise = getattr(cls, "normalise_tree", None)
    if normalise is not None:
        data = normalise(dict(data))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:  # an override like `train={1: 2}` (a file's keys were checked by read_yaml)
        check(isinstance(k, str), f"{dotted}{k}", f"keys must be names (strings), got {type(k).__name__}")
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


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``set_dotted(tree, "train.lr", 1e-5)``: tree["train"]["lr"] = 1e-5, making the missing mappings."""
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        check(isinstance(node, dict), dotted, f"cannot set a key below {p!r}, which is not a mapping")
    node[leaf] = value


# Expanded size above which a YAML file is refused: an alias of an alias of ... (a "billion laughs" file)
# would otherwise grow exponentially when the tree is walked, copied or dumped. Real configs have < 1000 nodes.
MAX_YAML_NODES = 100_000
_STR_TAG = "tag:yaml.org,2002:str"


def _check_nodes(node: yaml.Node, path: str, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Expanded node count below ``node``; refuses duplicate keys, non-string keys and recursive aliases."""
    if id(node) in sizes:
        return sizes[id(node)]
    check(id(node) not in open_nodes, path, "a recursive YAML alias (a node that contains itself)")
    open_nodes.add(id(node))
    size = 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                size += _check_nodes(value_node, path, sizes, open_nodes)
                continue
            where = f"{path}.{key_node.value}" if path else str(key_node.value)
            check(isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG, where,
                   f"keys must be names (strings), got {key_node.tag.rsplit(':', 1)[-1]} on line {line}")
            check(key_node.value not in seen, where,
                   f"duplicate key (lines {seen.get(key_node.value)} and {line}); the first would be lost")
            seen[key_node.value] = line
            size += _check_nodes(value_node, where, sizes, open_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            size += _check_nodes(item, f"{path}[{i}]", sizes, open_nodes)
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    check(size <= MAX_YAML_NODES, path or "<top level>",
           f"expands to more than {MAX_YAML_NODES} YAML nodes through aliases; refusing to build it")
    return size


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping: refuses what ``yaml.safe_load`` lets through silently (duplicate keys keep
    the last, non-string keys, alias bombs) and unreadable files, with errors naming the file and key."""
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    if not p.is_file():
        raise ConfigError("", "is a directory, not a YAML file" if p.is_dir() else "is not a regular file",
                          source)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError("", f"is not UTF-8 text (line {line}: {e.reason})", source) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _check_nodes(node, "", {}, set())
        tree = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML: {e}", source) from None
    except ConfigError as e:
        raise ConfigError(e.key, e.message, source) from None
    finally:
        loader.dispose()
    if not isinstance(tree, dict):
        raise ConfigError("", f"top level must be a mapping, got {type(tree).__name__}", source)
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-5`` -> ("train.lr", 1e-05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def build_config(cls: type, tree: dict, source: str | None = None) -> Any:
    """``cls`` built from a plain tree (nested mappings and lists, ``to_dict``'s shape) and validated; errors
    name the dotted key, and ``source`` when given."""
    try:
        return _build(cls, tree)
    except ConfigError as e:
        if source is None:
            raise
        raise ConfigError(e.key, e.message, source) from None


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Read a YAML file (optional) into ``cls``, apply dotted overrides, validate. Errors name the file."""
    return load_config_with_keys(cls, path, overrides)[0]


def load_config_with_keys(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> tuple[Any, set]:
    """(config, the dotted keys the user set) from one read of the file: ``load_config`` and ``given_keys``."""
    tree, keys, source = _read(path, overrides)
    return build_config(cls, tree, source), keys


def given_keys(path: str | Path | None, overrides: list[str] = ()) -> set[str]:
    """Dotted keys the user set in the YAML file or on the command line (``dpo``, ``dpo.model``,
    ``ppo.reward_model``): every key of the file, every override and the keys of a mapping it sets."""
    return _read(path, overrides)[1]


def _read(path: str | Path | None, overrides: list[str]) -> tuple[dict, set[str], str]:
    """(tree, keys the user set, source for errors): the file's tree with the overrides applied."""
    source = str(path) if path else "<defaults>"
    tree: dict = read_yaml(path) if path else {}
    keys = _keys_in(tree)  # before the overrides change the tree: they add their own keys below
    for text in overrides:
        key, value = parse_override(text)
        keys.add(key)
        if isinstance(value, dict):
            keys |= _keys_in(value, key + ".")
        set_dotted(tree, key, value)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    return tree, keys, source


def _keys_in(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in node.items():
        keys.add(f"{prefix}{k}")
        if isinstance(v, dict):
            keys |= _keys_in(v, f"{prefix}{k}.")
    return keys


def config_differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf where two config dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                for d in config_differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


# Keys that change how a run is operated, not what it computes (checkpoints resume bit for bit, evals and logs
# do not touch the weights): changing them neither re-runs a finished stage nor blocks a resume.
OPERATIONAL_KEYS = ("train.max_failures", "train.log_every", "train.eval_every", "train.checkpoint_every",
                    "train.checkpoint_minutes", "sync_check_every")


def result_differences(old, new) -> list[tuple[str, object, object]]:
    """config_differences without the operational keys: the changes that would change a stage's result."""
    return [d for d in config_differences(old, new) if not d[0].endswith(OPERATIONAL_KEYS)]


def to_dict(config: Any) -> dict:
    """Plain dict (tuples as lists) for YAML/JSON dumps and manifests."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))
