"""<run_dir>/manifest.json: what ran, with which config, where its checkpoint is, how it ended.

    {"stages": {"sft": {"status": "done", "config": {...}, "checkpoint": "...", "metrics": {...},
                         "started": "...", "finished": "...", "seconds": 123.4, "error": null}, ...},
     "report": "report.md"}

Status: running (set before the stage starts; still "running" after a crash), done, failed (with the error).
Written whole to a temporary file and renamed, so a stopped run never leaves half a manifest.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from unipipe_ray.runtime.files import write_json_atomic


class Manifest:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def start(self, name: str, config: dict, data_files: dict | None = None) -> None:
        """``data_files``: {file: sha256} of what the stage reads (data/fingerprint.py), compared by run.plan."""
        self.data["stages"][name] = {"status": "running", "config": config, "checkpoint": None, "metrics": None,
                                     "started": _now(), "finished": None, "seconds": None, "error": None,
                                     "data_files": data_files or {}}
        self.save()

    def finish(self, name: str, result: dict) -> None:
        entry = self.data["stages"][name]
        entry.update(status="done", checkpoint=str(result["checkpoint"]), finished=_now(),
                     seconds=result.get("seconds"), metrics=_plain(result.get("metrics") or {}))
        self.save()

    def fail(self, name: str, error: BaseException) -> None:
        entry = self.data["stages"][name]
        entry.update(status="failed", finished=_now(), error=f"{type(error).__name__}: {error}")
        self.save()

    def forget_after(self, names: list[str]) -> None:
        """Drop entries of stages that must run again (their inputs changed)."""
        for name in names:
            self.data["stages"].pop(name, None)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data, default=str)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
