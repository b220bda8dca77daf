"""The trials of a finished (or interrupted) Tune experiment, read from its directory: plain files, no Ray.

Layout read (Tune 2.x): ``<exp>/<trial>/{params.json, result.json (JSON lines, the last is the final result),
error.txt}`` and ``<exp>/experiment_state-*.json`` for trial statuses; a directory without params.json (the
trainable's ``stages/``) is not a trial.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

STATES = {"TERMINATED": "done", "ERROR": "error"}  # Tune's trial status -> ours; any other is unfinished

UNFINISHED = "running/unfinished"

STOPPED = "stopped early"  # ended by the scheduler: its last result is not the final one, so not analysed


def _read_results(path: Path) -> tuple[list[dict], str | None]:
    """The parsable lines of result.json and a note on what was wrong: a trial killed mid-write leaves a
    partial last line, which must not sink the whole report."""
    if not path.is_file():
        return [], "no result.json"
    rows, bad = [], 0
    for line in filter(str.strip, path.read_text(errors="replace").splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    rows = [r for r in rows if isinstance(r, dict)]
    return rows, f"{bad} corrupt line(s) in result.json skipped" if bad else None if rows else "empty result.json"



def _tune_statuses(exp: Path) -> dict[str, str]:
    """{trial dir name: Tune status} from the newest experiment_state-*.json ({} when absent or unreadable).
    Needed because a function trial that returns normally never logs ``done: true`` in result.json."""
    # Newest by the start time in the name: a restored run may touch the older files too, so mtimes tie or lie.
    files = sorted(exp.glob("experiment_state-*.json"), key=lambda p: p.name)
    try:
        states = [json.loads(t[0]) for t in json.loads(files[-1].read_text())["trial_data"]] if files else []
        return {s["relative_logdir"]: s["status"] for s in states if s.get("relative_logdir")}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}



def load_trials(exp_dir) -> list[dict]:
    """One record per trial directory: {"trial", "params", "metrics" (last result line without "config"),
    "history" (every line), "status" ("done" | "error" | "stopped early" | "running/unfinished"), "note"}.
    The status comes from Tune's experiment state; without it, error.txt means "error" and results "done"."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"experiment directory {exp} does not exist")
    states, records = _tune_statuses(exp), []
    for d in sorted(p for p in exp.iterdir() if (p / "params.json").is_file()):
        try:
            params = json.loads((d / "params.json").read_text())
        except ValueError:
            params = {}
        history, note = _read_results(d / "result.json")
        error = d / "error.txt"
        status = STATES.get(states[d.name], UNFINISHED) if d.name in states else "error" if error.is_file() else "done"
        if status == "done" and not history:
            status = UNFINISHED  # nothing to report is never a finished trial
        elif status == "done" and history[-1].get("final") is False:
            status = STOPPED  # a scheduler (ASHA) ended it before its last stage's final evaluation
        if status == "error" and error.is_file():  # the exception line, e.g. "RuntimeError: CUDA out of memory"
            note = ([ln.strip() for ln in error.read_text(errors="replace").splitlines() if ln.strip()] or [""])[-1]
        metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "config"}
        records.append({"trial": d.name, "params": params, "metrics": metrics, "history": history,
                        "status": status, "note": note and note[:200]})
    if not records:
        raise ValueError(f"{exp} holds no Tune trials (no subdirectory with a params.json)")
    return records



def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)



def finished(records: list[dict], metric: str) -> list[dict]:
    """The trials that count: done, with a numeric metric (an errored trial's last line is an earlier stage)."""
    return [r for r in records if r["status"] == "done" and is_number(r["metrics"].get(metric))]
