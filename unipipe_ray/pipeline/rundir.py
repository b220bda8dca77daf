"""The run directory: a local path, or a URI of any filesystem pyarrow supports (s3://, gs://, hdfs://, file://).

With a URI, the work is split by who writes what. The stages write their checkpoints to the URI themselves,
from whichever node they run on (Ray Train through ``RunConfig(storage_path, storage_filesystem)``, PPO's
trainers by uploading; see core/storage.py and ppo/state.py): a worker restarted on another node, or a run
continued on another machine, reads them there. The driver's own files (the manifest, each stage's config,
result and history, tensorboard, the report) are written in a local staging copy,
``<cache_dir>/runs/<uri>-<hash>`` (``UNIPIPE_CACHE``), mirrored to the URI through ``pyarrow.fs``:

    before the run     pull the manifest and the stages' driver files (not replaced/, report, plots)
    a stage starts     push the manifest
    a stage ends       push its driver files, then the manifest (done, or failed: any exception, Ctrl-C too)
    outputs replaced   move <uri>/<stage> to <uri>/replaced/<stage>-<time> (its checkpoints too)
    after the report   push report.md, report.json, plots/, then the manifest

In a stage directory the mirror owns the files at its top and under tensorboard/; what the stage wrote to
the URI itself (``<stage>/<stage>/`` of Ray Train, PPO's ``checkpoint/``, ``final-*``, ``best_gold-*``) is
neither downloaded nor deleted by it. On pull, per stage, the staging copy wins when it holds the same
attempt as the URI (the same ``started`` in both manifests: it is as far along or further, e.g. after a push
that failed, and is pushed then); otherwise the URI's copy wins, and a stale staging copy moves to
<staging>/replaced/ first.

The driver's small JSON and markdown files name the staging copy's paths (``output_dir``, ``run_dir``): at
the URI they name the URI instead, and a run continued on another machine (another staging directory)
reads them back as its own paths, so its finished stages are skipped and a failed one resumes. Checkpoints
are named by their URI everywhere.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from unipipe_ray.core import storage
from unipipe_ray.core.models import cache_dir
from unipipe_ray.pipeline.manifest import Manifest
from unipipe_ray.runtime.files import write_text_atomic
from unipipe_ray.runtime.logs import progress

log = logging.getLogger(__name__)


def is_uri(run_dir: str) -> bool:
    return "://" in run_dir


def staging_dir(uri: str) -> Path:
    """The local working copy of a URI run_dir: readable and unique (a hash of the URI)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", uri).strip("-")[-80:]
    return (cache_dir() / "runs" / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}").resolve()


def set_aside(path: Path, run_dir: Path, suffix: str = "") -> Path | None:
    """Move ``path`` to <run_dir>/replaced/<name>-<time><suffix> instead of deleting it (nothing lost silently)."""
    if not path.exists():
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir / "replaced" / f"{path.name}-{stamp}{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), target)
    return target


class RunDir:
    """``local``: where the run works. For a URI run_dir also ``uri`` (without its ?query), ``spec`` (with it)
    and the remote copy that ``pull`` and ``push`` keep in step; for a local one both are no-ops."""

    def __init__(self, run_dir: str):
        self.fs = self.uri = self.spec = None
        if not is_uri(run_dir):
            self.local = Path(run_dir).resolve()
            return
        self.uri, self.spec = run_dir.split("?", 1)[0].rstrip("/"), run_dir
        self.fs, self.root = _open(run_dir)
        self.local = staging_dir(self.uri)

    def shown(self, path: str | Path) -> str:
        """A path in the run as the user knows it: under the URI for a URI run_dir."""
        return _swap(str(path), str(self.local), self.uri) if self.uri else str(path)

    def storage(self, stage: str) -> str | None:
        """Where a stage writes its checkpoints itself: ``<uri>/<stage>`` (query kept), None for a local run."""
        return storage.join(self.spec, stage) if self.spec else None

    def set_aside(self, stage: str) -> Path | None:
        """A stage's outputs that are about to be replaced go to replaced/, here and at the URI (checkpoints
        included: copied within the store first, so an interrupted move loses nothing)."""
        import pyarrow.fs as pafs

        moved = set_aside(self.local / stage, self.local)
        if self.fs is not None and self._list(stage):
            name = moved.name if moved else f"{stage}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
            made: set[str] = set()
            for rel, kind in self._list(stage):
                if kind == pafs.FileType.File:
                    dst = f"{self.root}/replaced/{name}/{rel[len(stage) + 1:]}"
                    if dst.rsplit("/", 1)[0] not in made:
                        self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
                        made.add(dst.rsplit("/", 1)[0])
                    self.fs.copy_file(f"{self.root}/{rel}", dst)
            self.fs.delete_dir(f"{self.root}/{stage}")
            if moved is None:
                moved = self.local / "replaced" / name
        return moved

    def pull(self, stages: list[str] | tuple[str, ...]) -> None:
        """Bring the URI's manifest and these stages' directories into the staging copy (who wins: see above)."""
        if self.fs is None:
            return
        remote = json.loads(self._read("manifest.json") or "null") or {"stages": {}}
        manifest = Manifest(self.local)
        newer = []
        for stage in stages:
            mine, theirs = manifest.stage(stage), remote["stages"].get(stage)
            if _attempt(mine) != _attempt(theirs):
                stale = set_aside(self.local / stage, self.local, suffix="-stale")
                if stale:
                    log.warning("%s: the staging copy held another attempt, moved to %s", stage, stale)
                mine = theirs
            elif mine != theirs:
                newer.append(stage)
            pulled = self._get_missing(stage)
            if pulled:
                progress(f"pipeline: {stage}: pulled {pulled} files from {self.uri}/{stage}")
            remote["stages"].pop(stage, None)
            if mine is not None:
                remote["stages"][stage] = mine
        manifest.data = remote
        manifest.save()
        if newer:  # the staging copy got further than the URI (its last push failed): the URI catches up
            self.push(*newer, "manifest.json")

    def push(self, *names: str) -> None:
        """Mirror these files or directories of the staging copy (paths relative to it) to the URI, in order."""
        if self.fs is None:
            return
        for name in names:
            src = self.local / name
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            keep = [rel for rel in (p.relative_to(self.local).as_posix() for p in files) if _mirrored(rel)]
            files = [self.local / rel for rel in keep]
            made: set[str] = set()  # directories made in this push (deletes come after the uploads)
            for rel in keep:
                self._put(rel, made)
            self._delete_others(name, set(keep))
            if src.is_dir():  # single files (the manifest, the report) go without a line
                size = sum(p.stat().st_size for p in files) / 2**20
                progress(f"pipeline: pushed {name} to {self.uri}/{name} ({len(files)} files, {size:.1f} MiB)")

    # ------------------------------------------------------------------------------------------ transfers

    def _put(self, rel: str, made: set[str]) -> None:
        import pyarrow.fs as pafs

        dst = f"{self.root}/{rel}"
        parent = dst.rsplit("/", 1)[0]
        if parent not in made:  # a local filesystem needs the directories; object stores ignore them
            self.fs.create_dir(parent, recursive=True)
            made.add(parent)
        if _holds_paths(rel):
            with self.fs.open_output_stream(dst) as f:
                f.write(_relocate(rel, (self.local / rel).read_text(), str(self.local), self.uri, _ALL).encode())
        else:
            pafs.copy_files(str(self.local / rel), dst, destination_filesystem=self.fs)

    def _get_missing(self, name: str) -> int:
        """Download the files under <uri>/<name> that the staging copy lacks; returns how many."""
        import pyarrow.fs as pafs

        missing = [rel for rel, kind in self._list(name)
                   if kind == pafs.FileType.File and _mirrored(rel) and not (self.local / rel).exists()]
        for rel in missing:
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if _holds_paths(rel):
                write_text_atomic(target, self._read(rel))
            else:
                pafs.copy_files(f"{self.root}/{rel}", str(target), source_filesystem=self.fs)
        return len(missing)

    def _delete_others(self, name: str, keep: set[str]) -> None:
        """Delete what <uri>/<name> holds beyond ``keep``: files, then directories left empty, deepest first."""
        import pyarrow.fs as pafs

        entries = sorted(self._list(name), key=lambda e: (e[1] != pafs.FileType.File, -e[0].count("/")))
        for rel, kind in entries:
            if not _mirrored(rel if kind == pafs.FileType.File else f"{rel}/-"):  # the stage's own, at the URI
                continue
            if kind == pafs.FileType.File and rel not in keep:
                self.fs.delete_file(f"{self.root}/{rel}")
            elif kind == pafs.FileType.Directory and not any(k.startswith(rel + "/") for k in keep):
                try:
                    self.fs.delete_dir(f"{self.root}/{rel}")
                except FileNotFoundError:  # an object store's implicit directory went with its last file
                    pass

    def _list(self, name: str) -> list[tuple[str, object]]:
        """(path relative to the run, FileType) of <uri>/<name> and, for a directory, of everything under it."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(f"{self.root}/{name}")
        if info.type == pafs.FileType.NotFound:
            return []
        found = [info] + (self.fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
                          if info.type == pafs.FileType.Directory else [])
        return [(i.path[len(self.root) + 1:], i.type) for i in found]

    def _read(self, rel: str) -> str | None:
        """The text of <uri>/<rel> with local paths in it, or None when there is no such file."""
        try:
            with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
                text = f.read().decode()
        except FileNotFoundError:
            return None
        return _relocate(rel, text, self.uri, str(self.local), _DRIVER_KEYS) if _holds_paths(rel) else text


def _open(run_dir: str):
    """(filesystem, root path) of a URI run_dir, checked by writing a file there: a bad URI, a missing bucket or
    missing credentials stop the run here, before any training."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(run_dir)
        root = root.rstrip("/")
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/.unipipe-write-check") as f:
            f.write(b"ok")
        fs.delete_file(f"{root}/.unipipe-write-check")
    except Exception as e:
        raise ValueError(
            f"run_dir {run_dir!r} is not usable: {type(e).__name__}: {str(e).rstrip('.')}. run_dir takes a local "
            "path or a URI of a filesystem pyarrow supports (s3://bucket/path, gs://bucket/path, "
            "file:///absolute/path) that this machine can write to: check the scheme, that the bucket exists, and "
            "the credentials") from e
    return fs, root


def _attempt(entry: dict | None) -> str | None:
    return entry and entry.get("started")


def _holds_paths(rel: str) -> bool:
    """The small files that name paths in the run: at its top or at the top of a stage directory."""
    return rel.count("/") <= 1 and rel.endswith((".json", ".md"))


_ALL = None
_DRIVER_KEYS = frozenset({"output_dir", "run_dir", "manifest"})  # the JSON keys that name the staging copy


def _mirrored(rel: str) -> bool:
    """Files the mirror copies: anything outside a stage directory; in one, its top files and tensorboard/."""
    parts = rel.split("/")
    return len(parts) <= 2 or parts[0] in ("replaced", "plots") or parts[1] == "tensorboard"


def _relocate(rel: str, text: str, old: str, new: str, keys: frozenset | None) -> str:
    """``text`` with paths under ``old`` moved under ``new`` (markdown: the text; JSON: string values, only
    those under ``keys`` when given: on the way back from the URI, checkpoint URIs must stay URIs)."""
    if rel.endswith(".md"):
        return text.replace(old, new)
    try:
        data = json.loads(text)
    except ValueError:  # not JSON after all: leave it as it is
        return text
    return json.dumps(_walk(data, old, new, keys, keys is None), indent=2)


def _walk(node, old: str, new: str, keys: frozenset | None, inside: bool):
    if isinstance(node, str):
        return _swap(node, old, new) if inside else node
    if isinstance(node, dict):
        return {k: _walk(v, old, new, keys, inside or k in keys) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, old, new, keys, inside) for v in node]
    return node


def _swap(path: str, old: str, new: str) -> str:
    return new + path[len(old):] if path == old or path.startswith(old + "/") else path
