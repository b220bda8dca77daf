"""What a stage's data was made from, by content: a SHA-256 per file its ``data:`` config reads.

A stage resumed over the same config but an edited source file would otherwise train its second half on
other data without a word; the launcher and PPO's controller record these at the first start and refuse a
resume whose files changed (``data_changes``), and the chained run reruns a finished stage whose files
changed. Generated tasks (arith) have no file: their data is a function of the config, which is compared
already. A hub dataset (``hf:``) is recorded by name: its content cannot be read offline.
"""

from __future__ import annotations

from pathlib import Path

from unipipe_ray.core.storage import file_sha256


def source_paths(data) -> list[str]:
    """The files and directories a DataConfig reads: its sources, else its task's file."""
    paths = [s.path for s in data.sources] if data.sources else [data.task_path] if data.task_path else []
    return list(dict.fromkeys(paths))


def fingerprint(data) -> dict[str, str]:
    """{file: sha256} of every file the data config reads (a directory: each file under it); hub datasets
    map to "hub dataset (not hashed)". A missing file is left to the readers, which say so with its name."""
    out: dict[str, str] = {}
    for spec in source_paths(data):
        if spec.startswith("hf:"):
            out[spec] = "hub dataset (not hashed)"
            continue
        path = Path(spec)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                out[str(f)] = file_sha256(f)
        elif path.is_file():
            out[str(path)] = file_sha256(path)
    return out


def data_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What differs between two fingerprints, in words: "x.jsonl changed", "y.jsonl added", "z removed"."""
    out = [f"{p} changed" for p in old if p in new and old[p] != new[p]]
    out += [f"{p} added" for p in new if p not in old]
    out += [f"{p} removed" for p in old if p not in new]
    return out
