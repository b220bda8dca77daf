"""Read raw records from files, saved datasets and the hub, each with a location for error messages.

Locations: `path:LINE` (1-based) for JSON Lines, `path[record I]` (0-based) for everything else.
`datasets` and `pyarrow` are imported only when a source needs them.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from unipipe_ray.data.records import DataError

# What a damaged gzip stream raises: a bad header, a cut-off stream, corrupt deflate data.
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

SUPPORTED = ".jsonl, .jsonl.gz, .json (a list of objects), .json.gz, .parquet, a directory written by " \
            "datasets' save_to_disk, hf:<name>[:split]"


def read_raw(path) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) from `path`; the first bad line raises its DataError."""
    for loc, record in iter_raw(path):
        if isinstance(record, DataError):
            raise record
        yield loc, record


def iter_raw(path) -> Iterator[tuple[str, dict | DataError]]:
    """Like read_raw, but a bad line comes back as its DataError so a caller may skip it and read on.
    Problems that spoil the whole source (missing file, unknown format, broken .json) are raised."""
    name = os.fspath(path)
    if name.startswith("hf:"):
        yield from _read_hub(name)
        return
    p = Path(name)
    if not p.exists():
        raise FileNotFoundError(f"data source not found: {name}")
    if p.is_dir():
        yield from _read_saved(p, name)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(p, name)
    elif name.endswith((".json", ".json.gz")):
        yield from _read_json(p, name)
    elif name.endswith(".parquet"):
        yield from _read_parquet(p, name)
    else:
        raise DataError(f"unsupported data format; supported: {SUPPORTED}", "unsupported_format", name)


def _read_jsonl(p: Path, name: str):
    # Decode line by line from bytes: one bad byte then names its line instead of failing the whole file.
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                item = _jsonl_line(raw, f"{name}:{lineno}", lineno == 1)
                if item is not None:
                    yield item
    except _GZIP_ERRORS as e:
        raise DataError(f"cannot read gzip stream: {e}", "unreadable_file", name) from e


def read_jsonl_range(path, start: int, end: int, counts: dict | None = None) -> Iterator[tuple[str, dict | DataError]]:
    """(location, record or its DataError) for the lines of a plain .jsonl file that start in bytes
    [start, end). ``start`` must be a line start (``jsonl_ranges`` gives such ranges), so ranges read in
    parallel cover every line once. Locations are relative, ``path:+N`` for the range's N-th line: the caller
    adds the lines of the earlier ranges (``counts["lines"]`` is set to this range's count at the end)."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        f.seek(start)
        lineno, pos = 0, start
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            lineno, pos = lineno + 1, pos + len(raw)
            item = _jsonl_line(raw, f"{name}:+{lineno}", start == 0 and lineno == 1)
            if item is not None:
                yield item
    if counts is not None:
        counts["lines"] = lineno


def jsonl_ranges(path, target_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about ``target_bytes`` covering a plain .jsonl file, each starting at a line start."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + target_bytes < size:
            f.seek(cuts[-1] + target_bytes)
            f.readline()  # to the end of the line the guess fell in
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return list(zip(cuts, [*cuts[1:], size], strict=True))


def _jsonl_line(raw: bytes, loc: str, first: bool):
    """(loc, record or DataError) of one JSON Lines line; None for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return loc, DataError(f"invalid UTF-8 (byte {e.start} of the line)", "invalid_utf8", loc)
    if not line.strip():
        return None  # blank lines (a trailing newline, spacing) hold no record
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return loc, DataError(f"malformed JSON: {e.msg} (column {e.colno})", "malformed_json", loc)
    except RecursionError:
        return loc, DataError("JSON nested too deeply to read", "malformed_json", loc)
    return loc, _as_object(record, loc)


def _read_json(p: Path, name: str):
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            data = f.read()
    except _GZIP_ERRORS as e:
        raise DataError(f"cannot read gzip stream: {e}", "unreadable_file", name) from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError("invalid UTF-8", "invalid_utf8", f"{name}:{line}") from e
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", "malformed_json",
                        f"{name}:{e.lineno}") from e
    except RecursionError:
        raise DataError("JSON nested too deeply to read", "malformed_json", name) from None
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of objects, got {type(records).__name__}", "wrong_type", name)
    for i, record in enumerate(records):
        loc = f"{name}[record {i}]"
        yield loc, _as_object(record, loc)


def _read_parquet(p: Path, name: str):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
        rows = (row for batch in batches for row in batch.to_pylist())
        yield from ((f"{name}[record {i}]", row) for i, row in enumerate(rows))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read parquet: {e}", "unreadable_file", name) from e


def _read_saved(p: Path, name: str):
    if (p / "dataset_dict.json").exists():
        try:
            splits = list(json.loads((p / "dataset_dict.json").read_text())["splits"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"dataset_dict.json is not a saved DatasetDict's index ({type(e).__name__}: {e})",
                            "unreadable_file", name) from None
        if not splits:
            raise DataError("a saved DatasetDict with no splits", "no_records", name)
        if len(splits) != 1:
            raise DataError(f"a saved DatasetDict with splits {splits}; pass one split's directory, e.g. "
                            f"{name}/{splits[0]}", "ambiguous_split", name)
        p, name = p / splits[0], f"{name}/{splits[0]}"
    if not (p / "state.json").exists():
        raise DataError(f"a directory, but not one written by datasets' save_to_disk (no state.json); "
                        f"supported: {SUPPORTED}", "unsupported_format", name)
    from datasets import load_from_disk

    yield from _rows(load_from_disk(str(p)), name)


def _read_hub(name: str):
    dataset, _, split = name[3:].partition(":")
    split = split or "train"
    if _offline():
        raise DataError(f"hub dataset '{dataset}' needs network access but HF_HUB_OFFLINE or "
                        f"HF_DATASETS_OFFLINE is set; download it and pass a local path",
                        "hub_unavailable", name)
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset, split=split)
    except Exception as e:  # the hub fails in many ways (no network, no such name/split); all mean "not here"
        raise DataError(f"cannot load hub dataset '{dataset}' split '{split}' (hf: sources need network "
                        f"access; offline, pass a local path): {type(e).__name__}: {e}", "hub_unavailable",
                        name) from e
    yield from _rows(ds, name)


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _rows(ds, name: str):
    for i, row in enumerate(ds):
        yield f"{name}[record {i}]", row


def _as_object(record, loc: str):
    if isinstance(record, dict):
        return record
    return DataError(f"expected a JSON object, got {type(record).__name__}", "wrong_type", loc)
