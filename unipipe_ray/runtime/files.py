"""Writes that a kill cannot tear: a file or a directory appears whole under its name, or not at all.

A file is written beside its target and moved over it with ``os.replace`` (atomic on POSIX), so a reader
sees the old copy or the new one, never a truncated JSON. A directory (a checkpoint, ``final/``) is built
under ``<name>.new`` and swapped in; a kill mid-swap leaves ``<name>.old``, which ``recover_dir`` puts back.
Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same directory, flushed to disk, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill: the old copy stays, no stray temp file
        raise
    return path


def write_json_atomic(path: str | Path, data: Any, **dumps_kwargs) -> Path:
    return write_text_atomic(path, json.dumps(data, **{"indent": 2, **dumps_kwargs}))


def sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def replace_dir(directory: str | Path, build: Callable[[Path], None], complete: str | None = None) -> Path:
    """Build a directory with ``build(tmp)`` under ``<directory>.new`` and swap it in for ``directory``.

    Until the swap, ``directory`` is the previous copy, whole; between the two renames it is ``<dir>.old``,
    which ``recover_dir`` restores. ``complete`` names a file the build must have written (a marker that the
    build finished, e.g. the controller state of a PPO checkpoint); without it the old copy is kept.
    """
    directory = Path(directory)
    new, old = sibling(directory, ".new"), sibling(directory, ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.parent.mkdir(parents=True, exist_ok=True)
    build(new)
    if complete is not None and not (new / complete).is_file():
        raise RuntimeError(f"{new}: the build did not write {complete}; {directory} left as it was")
    if directory.exists():  # complete, so an .old beside it is stale (a kill after an earlier swap)
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    new.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def recover_dir(directory: str | Path, complete: str | None = None) -> Path | None:
    """The last complete copy of a ``replace_dir`` directory, moved back under its own name; None if none.

    Resuming from ``<dir>.old`` in place would point the trainers and engines at a directory that the next
    ``replace_dir`` deletes, so the old copy is renamed back first. A half-built ``<dir>.new`` is dropped.
    """
    directory = Path(directory)
    new, old = sibling(directory, ".new"), sibling(directory, ".old")

    def whole(d: Path) -> bool:
        return d.is_dir() and (complete is None or (d / complete).is_file())

    if not whole(directory) and whole(old):
        shutil.rmtree(directory, ignore_errors=True)
        old.rename(directory)
    shutil.rmtree(new, ignore_errors=True)
    if whole(directory):
        shutil.rmtree(old, ignore_errors=True)
        return directory
    return None


class RunLocked(RuntimeError):
    """Another live process holds the run directory (a second ``unipipe run`` or ``ray job submit``)."""


@contextlib.contextmanager
def run_lock(directory: str | Path, what: str = "run"):
    """Hold ``<directory>/.lock`` for the duration: a second holder is refused with the first one's name.

    An ``flock`` on an open file: the kernel releases it when the holder dies, however it dies, so a
    killed run never leaves a stale lock. The file records who holds it (host, pid, start time, Ray job).
    """
    import fcntl
    import socket
    import time

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    f = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLocked(f"{directory} is in use by {holder}; wait for that {what} to end or use another "
                            f"directory") from None
        f.seek(0)
        f.truncate()
        job = os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID")
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                + (f" (Ray job {job})" if job else ""))
        f.flush()
        yield path
    finally:
        f.close()  # releases the flock
