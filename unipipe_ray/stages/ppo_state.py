"""PPO's resumable state: the trainers' checkpoints plus the controller's own (iteration, history, KL
controller, hacking watch, best gold reward).

    <output_dir>/checkpoint/policy/    Hugging Face weights + engine/ (optimizer, schedule)
    <output_dir>/checkpoint/critic/    the same for the critic (GAE only)
    <output_dir>/checkpoint/controller.json

A new checkpoint is written beside the old one and swapped in when complete, so a run stopped while
saving still finds a whole checkpoint (the old one, if the swap did not happen). The trainers write the
files themselves: on a multi-node cluster ``output_dir`` must be storage every node sees.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CONTROLLER = "controller.json"


def save(directory: Path, groups: dict, tokenizer_dir: str, controller: dict) -> None:
    new, old = directory.with_name(directory.name + ".new"), directory.with_name(directory.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    groups["policy"].call("save_checkpoint", str(new / "policy"), tokenizer_dir)
    if "critic" in groups:
        groups["critic"].call("save_checkpoint", str(new / "critic"), tokenizer_dir)
    (new / CONTROLLER).write_text(json.dumps(controller))
    if directory.exists():  # complete, so an .old beside it is stale (a crash after an earlier swap)
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    new.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def find(directory: Path) -> Path | None:
    """The last complete checkpoint (the swap's old copy if the run stopped mid-swap), or None."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / CONTROLLER).is_file():
            return candidate
    return None


def load_controller(checkpoint: Path) -> dict:
    return json.loads((checkpoint / CONTROLLER).read_text())
