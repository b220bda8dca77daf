"""PPO's resumable state: the trainers' checkpoints plus the controller's own (iteration, history, KL
controller, hacking watch, best gold reward).

In a local directory:

    <output_dir>/checkpoint/policy/    Hugging Face weights + engine/ (optimizer, schedule)
    <output_dir>/checkpoint/critic/    the same for the critic (GAE only)
    <output_dir>/checkpoint/controller.json

A new checkpoint is written beside the old one and swapped in when complete (files.replace_dir), so a run
stopped while saving still finds a whole checkpoint (the old one, if the swap did not happen).

In cluster storage (a URI: no shared filesystem, and an object store has no rename), each checkpoint gets
its own directory and a pointer written last commits it:

    <storage>/checkpoint/iteration-000004/{policy,critic,controller.json}
    <storage>/checkpoint/latest.json   {"checkpoint": "iteration-000004", "iteration": 4}

The trainers upload their parts from their own nodes, the driver then writes controller.json and the
pointer (one object, visible whole or not at all), and only then deletes the older directories. A run
killed at any point of an upload resumes from what the pointer names: never from a mix of two checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

from unipipe_ray.core import storage
from unipipe_ray.runtime.files import recover_dir, replace_dir, write_json_atomic

CONTROLLER = "controller.json"  # written last among a checkpoint's files
LATEST = "latest.json"          # cluster storage: the commit pointer
PREFIX = "iteration-"


def save(directory: Path | str, groups: dict, tokenizer_dir: str, controller: dict, fail_before_commit=None) -> None:
    """``fail_before_commit`` (tests): raised once every part is uploaded, before the pointer moves."""
    if storage.is_uri(directory):
        _save_uri(str(directory), groups, tokenizer_dir, controller, fail_before_commit)
        return

    def build(new: Path) -> None:
        _save_parts(str(new), groups, tokenizer_dir)
        write_json_atomic(new / CONTROLLER, controller, indent=None)

    replace_dir(Path(directory), build, complete=CONTROLLER)


def _save_parts(target: str, groups: dict, tokenizer_dir: str) -> None:
    groups["policy"].call("save_checkpoint", storage.join(target, "policy") if storage.is_uri(target)
                          else f"{target}/policy", tokenizer_dir)
    if "critic" in groups:
        groups["critic"].call("save_checkpoint", storage.join(target, "critic") if storage.is_uri(target)
                              else f"{target}/critic", tokenizer_dir)


def _save_uri(root: str, groups: dict, tokenizer_dir: str, controller: dict, fail_before_commit) -> None:
    name = f"{PREFIX}{controller['iteration']:06d}"
    target = storage.join(root, name)
    storage.delete(target)  # what an interrupted save of this same iteration left
    _save_parts(target, groups, tokenizer_dir)
    storage.write_text(storage.join(target, CONTROLLER), json.dumps(controller))
    if fail_before_commit is not None:
        raise fail_before_commit
    storage.write_text(storage.join(root, LATEST), json.dumps({"checkpoint": name,
                                                                "iteration": controller["iteration"]}))
    for other in storage.children(root):  # older checkpoints and leftovers of uncommitted ones
        if other.startswith(PREFIX) and other != name:
            storage.delete(storage.join(root, other))


def find(directory: Path | str) -> Path | str | None:
    """The last complete checkpoint. Locally always under ``directory`` (a copy left at ``.old`` by a run
    stopped mid-swap is moved back first: the trainers must not load from a directory the next save
    deletes); in cluster storage the one ``latest.json`` names."""
    if storage.is_uri(directory):
        pointer = storage.read_text(storage.join(str(directory), LATEST))
        return storage.join(str(directory), json.loads(pointer)["checkpoint"]) if pointer else None
    return recover_dir(Path(directory), complete=CONTROLLER)


def part(checkpoint: Path | str, name: str) -> Path | str | None:
    """The checkpoint's ``policy`` or ``critic`` directory, None when it has none."""
    if storage.is_uri(checkpoint):
        sub = storage.join(str(checkpoint), name)
        return sub if storage.exists(sub) else None
    sub = Path(checkpoint) / name
    return sub if sub.is_dir() else None


def load_controller(checkpoint: Path | str) -> dict:
    if storage.is_uri(checkpoint):
        return json.loads(storage.read_text(storage.join(str(checkpoint), CONTROLLER)))
    return json.loads((Path(checkpoint) / CONTROLLER).read_text())
