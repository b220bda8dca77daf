"""PPO's resumable state: the trainers' checkpoints plus the controller's own (iteration, history, KL
controller, hacking watch, best gold reward).

    <output_dir>/checkpoint/policy/    Hugging Face weights + engine/ (optimizer, schedule)
    <output_dir>/checkpoint/critic/    the same for the critic (GAE only)
    <output_dir>/checkpoint/controller.json

A new checkpoint is written beside the old one and swapped in when complete (files.replace_dir), so a run
stopped while saving still finds a whole checkpoint (the old one, if the swap did not happen). The trainers write the
files themselves: on a multi-node cluster ``output_dir`` must be storage every node sees.
"""

from __future__ import annotations

import json
from pathlib import Path

from unipipe_ray.runtime.files import recover_dir, replace_dir, write_json_atomic

CONTROLLER = "controller.json"  # written last: its presence marks a complete checkpoint


def save(directory: Path, groups: dict, tokenizer_dir: str, controller: dict) -> None:
    def build(new: Path) -> None:
        groups["policy"].call("save_checkpoint", str(new / "policy"), tokenizer_dir)
        if "critic" in groups:
            groups["critic"].call("save_checkpoint", str(new / "critic"), tokenizer_dir)
        write_json_atomic(new / CONTROLLER, controller, indent=None)

    replace_dir(directory, build, complete=CONTROLLER)


def find(directory: Path) -> Path | None:
    """The last complete checkpoint, always under ``directory`` (a copy left at ``.old`` by a run stopped
    mid-swap is moved back first: the trainers must not load from a directory the next save deletes)."""
    return recover_dir(directory, complete=CONTROLLER)


def load_controller(checkpoint: Path) -> dict:
    return json.loads((checkpoint / CONTROLLER).read_text())
