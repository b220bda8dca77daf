"""Checkpoints in cluster storage: URIs of any filesystem pyarrow supports (s3://, gs://, hdfs://, file://).

On several nodes without a shared filesystem, a checkpoint written on one node must be readable on every
other: the stages write them to a URI (Ray Train through ``RunConfig(storage_path, storage_filesystem)``,
PPO's trainers by uploading what they saved), and whoever loads one (a worker, a PPO role, the report)
downloads it once per node with ``localize``. A URI keeps its ``?query`` (``endpoint_override=...`` for a
private S3 endpoint) last: ``join("s3://b/run?x=1", "sft")`` is ``s3://b/run/sft?x=1``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def is_uri(path) -> bool:
    return "://" in str(path)


def split(uri: str) -> tuple[str, str]:
    """(the URI without its query, the query or "")."""
    base, _, query = uri.partition("?")
    return base.rstrip("/"), query


def join(uri: str, *parts: str) -> str:
    base, query = split(uri)
    path = "/".join([base, *(p.strip("/") for p in parts if p)])
    return f"{path}?{query}" if query else path


def relative(uri: str, root: str) -> str | None:
    """The part of ``uri`` under ``root`` ("" for root itself), or None when it is not under it."""
    (base, query), (root_base, root_query) = split(uri), split(root)
    if query != root_query:
        return None
    if base == root_base:
        return ""
    return base[len(root_base) + 1:] if base.startswith(root_base + "/") else None


@functools.lru_cache(maxsize=256)
def open_uri(uri: str):
    """(pyarrow filesystem, path in it) of a URI, cached: opening one may cost a request (S3 asks for the
    bucket's region)."""
    import pyarrow.fs as pafs

    base, query = split(uri)
    fs, path = pafs.FileSystem.from_uri(base + (f"?{query}" if query else ""))
    return fs, path.rstrip("/")


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = open_uri(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def listing(uri: str) -> list[tuple[str, int, int]]:
    """(path relative to ``uri``, size, mtime in ns) of every file under it, sorted; [] when it is missing."""
    import pyarrow.fs as pafs

    fs, path = open_uri(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i.path[len(path) + 1:], i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File)


def children(uri: str) -> list[str]:
    """Names of the entries directly under ``uri``."""
    import pyarrow.fs as pafs

    fs, path = open_uri(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))


def read_text(uri: str) -> str | None:
    fs, path = open_uri(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def write_text(uri: str, text: str) -> None:
    """One object written whole: object stores make it visible only once complete (our commit markers rely
    on that); on a local filesystem pyarrow writes in place, so a file:// marker is written beside and moved."""
    fs, path = open_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = open_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload_dir(local: str | Path, uri: str) -> int:
    """Copy every file under ``local`` to ``uri`` (same relative paths); returns how many."""
    import pyarrow.fs as pafs

    fs, path = open_uri(uri)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    made = set()
    for f in files:
        dst = f"{path}/{f.relative_to(local).as_posix()}"
        parent = dst.rsplit("/", 1)[0]
        if parent not in made:  # a local filesystem needs the directories; object stores ignore them
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        pafs.copy_files(str(f), dst, destination_filesystem=fs)
    return len(files)


def download(uri: str, target: str | Path, skip: tuple[str, ...] = ()) -> int:
    """Copy the files under ``uri`` into ``target`` (same relative paths, overwriting), except those whose
    path starts with one of ``skip``; returns how many."""
    import pyarrow.fs as pafs

    fs, path = open_uri(uri)
    files = [rel for rel, _, _ in listing(uri) if not rel.startswith(skip)]
    for rel in files:
        (Path(target) / rel).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{path}/{rel}", str(Path(target) / rel), source_filesystem=fs)
    return len(files)


def delete(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = open_uri(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def localize(spec: str | Path | None) -> str | Path | None:
    """A local directory with the files of ``spec``: a URI's are downloaded once per node, into
    ``<cache>/remote/<hash>``; a local path (or None) is returned as it is.

    The cache key covers the URI and every file's size and modification time, so a directory written again
    at the same URI (a re-run's ``final``) is downloaded again. The download goes to a temporary directory
    renamed into place when complete: processes racing for it, or a download killed half way, never leave a
    partial copy that the next caller would take for whole."""
    if spec is None or not is_uri(spec):
        return spec
    spec = str(spec)
    from unipipe_ray.core.models import cache_dir

    files = listing(spec)
    if not files:
        raise FileNotFoundError(f"{spec}: no such checkpoint (nothing is stored under that URI)")
    key = hashlib.sha256(json.dumps([split(spec)[0], files]).encode()).hexdigest()[:16]
    target = cache_dir() / "remote" / f"{split(spec)[0].rsplit('/', 1)[-1]}-{key}"
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    import pyarrow.fs as pafs

    fs, path = open_uri(spec)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        for rel, _, _ in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{path}/{rel}", str(tmp / rel), source_filesystem=fs)
        try:
            os.rename(tmp, target)
        except OSError:  # another process on this node finished first: its copy is the same files
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded %s (%d files) to %s", spec, len(files), target)
    return str(target)


@contextlib.contextmanager
def writing_to(target: str):
    """A local directory to write ``target``'s files into: ``target`` itself when it is a path; for a URI a
    temporary directory (beside the cache, not in /tmp, which is often a small tmpfs) uploaded on success."""
    if not is_uri(target):
        yield target
        return
    from unipipe_ray.core.models import cache_dir

    (cache_dir() / "uploads").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir() / "uploads") as tmp:
        yield tmp
        upload_dir(tmp, target)


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a local file's content, read in chunks (model files and datasets do not fit a read())."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
