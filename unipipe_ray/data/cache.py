"""A stage's tokenized data as cached shards: planned on the driver, tokenized anywhere, selected by row number.

    shards = plan_shards(data, kind)                      # byte ranges of big .jsonl files, whole other files,
                                                          # or chunks of a built-in task's examples
    stats = tokenize_shard(shard, kind, tok, ..., target)  # read + check + tokenize one shard into an Arrow file
    train_rows, eval_rows, info = select_rows(data, kind, shards, stats)   # on the driver, from stats alone

``tokenize_shard`` is a plain function, so the runtime can run the shards on Ray Data across the cluster or
in the driver's process and get the same files. A shard file holds one row per record that parsed (a row
that then failed tokenization is kept, empty, so row numbers stay the records' positions); parse errors live
only in the shard's stats. ``select_rows`` then reproduces ``stage_examples`` + ``tokenize_all`` on row
numbers instead of records: the same bad-record errors and skip counts (with absolute line numbers), the
same weighted mixture and the same seeded splits, because those only ever depended on positions.

The cache key covers what decides the token ids: the sources' content (SHA-256 per file) and order, or the
built-in task's settings; the tokenizer's vocabulary, special tokens and chat template; ``max_length``,
``max_prompt_length``; the bad-record policy. The split (``seed``, ``eval_size``, ``size``, ``budget``,
weights) is not in it: it is recomputed from the stats in milliseconds, so one cache serves every split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from unipipe_ray.data.fingerprint import fingerprint
from unipipe_ray.data.load import PARSERS, LoadReport, _mix
from unipipe_ray.data.readers import SUPPORTED, iter_raw, jsonl_ranges, read_jsonl_range
from unipipe_ray.data.records import DataError
from unipipe_ray.data.stage_data import make_task, select_split
from unipipe_ray.data.table import absolute_line, write_shard
from unipipe_ray.data.tokenize import _prompt_limit, tokenize_preference, tokenize_prompt, tokenize_sft

log = logging.getLogger(__name__)

FORMAT = 2                   # bump when the shard layout or the stats change: old caches are then ignored
SHARD_BYTES = 8 << 20        # a plain .jsonl file is cut into ranges of about this size (1 GB: 128 tasks)
TASK_SHARD_EXAMPLES = 20_000  # a built-in task's examples per shard


@dataclass
class Shard:
    index: int
    source: int                            # position in data.sources (0 for a task)
    path: str | None = None                # the file read (None: a task's examples)
    span: tuple[int, int] | None = None    # byte range of a plain .jsonl file
    examples: list = field(default_factory=list, repr=False)  # a task's parsed examples


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides a tokenizer's ids: its vocabulary and rules (the fast tokenizer's JSON, else the
    vocabulary), special tokens and chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else
                  json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    digest.update(json.dumps([special, getattr(tokenizer, "chat_template", None)], sort_keys=True).encode())
    return digest.hexdigest()


def key_parts(data, kind: str, tokenizer) -> dict:
    """Everything the cache key covers, readable (stored beside the shards)."""
    parts = {"format": FORMAT, "kind": kind, "tokenizer": tokenizer_fingerprint(tokenizer),
             "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
             "on_bad_record": data.on_bad_record, "files": fingerprint(data)}
    if data.sources:
        parts["sources"] = [s.path for s in data.sources]
    else:  # a built-in task's examples depend on its settings (arith generates from the seed, gsm8k's slips)
        parts["task"] = {"name": data.task, "path": data.task_path, "size": data.task_size, "seed": data.seed}
    return parts


def cache_key(data, kind: str, tokenizer) -> str:
    return key_of(kind, key_parts(data, kind, tokenizer))


def key_of(kind: str, parts: dict) -> str:
    """The entry's directory name from ``key_parts`` (computed once by a caller that also keeps the parts)."""
    return f"{kind}-{hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]}"


def plan_shards(data, kind: str, shard_bytes: int | None = None) -> list[Shard]:
    """The shards of a stage's data. Sources that cannot be read at all fail here, with the readers' words."""
    shards: list[Shard] = []
    if not data.sources:
        task = make_task(data)
        examples = {"sft": task.sft_examples, "prompt": task.prompts,
                    "preference": lambda: task.preference_pairs(seed=data.seed)}[kind]()
        for i in range(0, max(len(examples), 1), TASK_SHARD_EXAMPLES):
            shards.append(Shard(len(shards), 0, examples=examples[i:i + TASK_SHARD_EXAMPLES]))
        return shards
    for s, source in enumerate(data.sources):
        name = os.fspath(source.path)
        if not name.startswith("hf:") and not os.path.exists(name):
            raise FileNotFoundError(f"data source not found: {name}")
        if name.endswith(".jsonl") and os.path.isfile(name):
            for span in jsonl_ranges(name, shard_bytes or SHARD_BYTES):
                shards.append(Shard(len(shards), s, name, span))
        elif name.startswith("hf:") or os.path.isdir(name) or name.endswith((".jsonl.gz", ".json", ".json.gz",
                                                                            ".parquet")):
            shards.append(Shard(len(shards), s, name))
        else:
            raise DataError(f"unsupported data format; supported: {SUPPORTED}", "unsupported_format", name)
    return shards


def tokenize_shard(shard: Shard, kind: str, tokenizer, max_length: int, max_prompt_length: int | None,
                   on_bad_record: str, target: str) -> dict:
    """Read, check and tokenize one shard into the Arrow file ``target``; returns its stats (JSON-able):
    records read, rows written, parse errors by kind with the first one, the rows that failed tokenization,
    truncation counts, lines read (a .jsonl range), or the ``fatal`` error that spoiled the whole source."""
    limit = _prompt_limit(max_length, max_prompt_length)
    cuts: Counter = Counter()
    one = {"sft": lambda ex: tokenize_sft(ex, tokenizer, max_length, limit, cuts),
           "preference": lambda ex: tokenize_preference(ex, tokenizer, max_length, limit, cuts),
           "prompt": lambda ex: {**tokenize_prompt(ex, tokenizer, limit, cuts), "example": _example_json(ex)}}[kind]
    stats = {"index": shard.index, "records": 0, "parse_errors": {}, "first_parse_error": None,
             "token_errors": [], "lines": None, "fatal": None}
    counts: dict = {}

    def features():
        for row, ex in enumerate(_examples(shard, kind, stats, on_bad_record, counts)):
            try:
                yield one(ex)
            except DataError as e:  # kept as an empty row: whether it is an error depends on the selection
                stats["token_errors"].append([row, e.message, e.kind, e.loc])
                yield {}

    stats["rows"] = 0
    try:
        stats["rows"] = write_shard(target, kind, features())
    except (DataError, FileNotFoundError) as e:  # the source as a whole: a broken .json, gzip or saved dir
        stats["fatal"] = [type(e).__name__, str(e) if isinstance(e, FileNotFoundError) else e.message,
                          getattr(e, "kind", None), getattr(e, "loc", None)]
    stats["lines"] = counts.get("lines")
    stats["cuts"] = dict(cuts)
    return stats


def _example_json(ex) -> str:
    """A prompt example as JSON (meta values JSON cannot hold, e.g. a Parquet timestamp, become strings)."""
    return json.dumps({"prompt": ex.prompt, "source": ex.source, "meta": ex.meta}, default=str)


def _examples(shard: Shard, kind: str, stats: dict, on_bad_record: str, counts: dict):
    """The shard's parsed examples; parse errors are counted in ``stats`` (the first kept whole), and under
    on_bad_record=error the shard stops at its first (the driver raises the earliest over all shards)."""
    if shard.path is None:
        stats["records"] = len(shard.examples)
        yield from shard.examples
        return
    parse = PARSERS[kind]
    raw_records = (read_jsonl_range(shard.path, *shard.span, counts) if shard.span else iter_raw(shard.path))
    for loc, raw in raw_records:
        stats["records"] += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            example = parse(raw, loc)
        except DataError as e:
            stats["parse_errors"][e.kind] = stats["parse_errors"].get(e.kind, 0) + 1
            stats["first_parse_error"] = stats["first_parse_error"] or [e.message, e.kind, e.loc]
            if on_bad_record == "error":
                return
            continue
        yield example


def select_rows(data, kind: str, shards: list[Shard], stats: list[dict]) -> tuple[list[int], list[int], dict]:
    """(train rows, held-out rows, info) over the shards' rows in order, as ``stage_examples`` then
    ``tokenize_all`` would select and drop the records; raises the same errors they would."""
    stats = sorted(stats, key=lambda s: s["index"])
    offsets = line_offsets(shards, stats)
    report = LoadReport(total=sum(st["records"] for st in stats))
    for st in stats:  # in reading order, so the error raised is the one a sequential read meets first
        first = st["first_parse_error"]
        if first and data.on_bad_record == "error":
            raise DataError(first[0], first[1], absolute_line(first[2], offsets[st["index"]]))
        if st["fatal"]:
            name, message, error_kind, loc = st["fatal"]
            raise FileNotFoundError(message) if name == "FileNotFoundError" else DataError(message, error_kind, loc)
        if first:
            report.skipped_by_kind.update(st["parse_errors"])
            report.first_skipped = report.first_skipped or absolute_line(first[2], offsets[st["index"]])
    starts, rows, start = [], [], 0
    for st in stats:
        starts.append(start)
        start += st["rows"]
    if data.sources:
        pools = [[] for _ in data.sources]
        for sh, st, first in zip(shards, stats, starts, strict=True):
            pools[sh.source].extend(range(first, first + st["rows"]))
        for source, pool in zip(data.sources, pools, strict=True):
            if not pool:
                raise DataError(f"no usable records ({report.summary()})", "no_records", os.fspath(source.path))
        if len(pools) == 1:
            rows = pools[0]
        else:
            names = [os.fspath(s.path) for s in data.sources]
            rows = _mix(pools, [s.weight for s in data.sources], names, None, data.seed, report)
        if report.skipped or report.notes:
            log.warning("%s", report.summary())
    else:
        rows = list(range(start))
    failed = {first + row: DataError(message, error_kind, absolute_line(loc, offsets[st["index"]]))
              for st, first in zip(stats, starts, strict=True)
              for row, message, error_kind, loc in st["token_errors"]}
    train, held_out = (_drop_failed(part, failed, data.on_bad_record, kind)
                       for part in select_split(rows, data, kind))
    cuts = Counter()
    for st in stats:
        cuts.update(st["cuts"])
    if cuts["prompt"] or cuts["response"]:  # the counters hold zeros for examples that kept everything
        log.warning("tokenized %s data: of %d records, %d prompts lost their earliest tokens and %d responses were "
                    "cut at their end (max_length %d)", kind, start, cuts["prompt"], cuts["response"],
                    data.max_length)
    return train, held_out, {"records": report.total, "rows": start, "load": report.summary()}


def _drop_failed(rows: list[int], failed: dict, on_bad_record: str, kind: str) -> list[int]:
    """``rows`` without those that failed tokenization, as tokenize_all drops (or raises) them."""
    if not failed:
        return rows
    report, kept = LoadReport(total=len(rows)), []
    for row in rows:
        if row in failed:
            if on_bad_record == "error":
                raise failed[row]
            report.skip(failed[row])
        else:
            kept.append(row)
    if report.skipped:
        log.warning("tokenize(%s): %s", kind, report.summary())
    if rows and not kept:
        raise DataError(f"no example left after tokenization ({report.summary()})", "no_records")
    return kept


def line_offsets(shards: list[Shard], stats: list[dict]) -> dict[int, int]:
    """Lines before each .jsonl range in its file: range locations ``path:+N`` become ``path:LINE``."""
    offsets, seen = {}, {}
    for sh, st in zip(shards, stats, strict=True):
        offsets[sh.index] = seen.get(sh.path, 0)
        if sh.span is not None:
            seen[sh.path] = offsets[sh.index] + (st["lines"] or 0)
    return offsets


