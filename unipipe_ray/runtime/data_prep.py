"""A stage's data, tokenized once into the cache and handed to the workers as row views.

    train, held_out, info = prepare_stage_data(cfg.data, "sft", tokenizer, cache_root)

On a miss the shards (data/cache.py) are tokenized with Ray Data, one task per shard on the cluster's CPUs
(``data.tokenize_with: ray_data``), or in this process (``driver``); ``auto`` takes Ray Data once the input
is big enough to repay its start-up (a few seconds). The shards land under ``<root>/<key>/`` and
``meta.json`` (their stats) is written last: a cache without it is incomplete, and is rebuilt over. On a hit
no record is read or tokenized: the selection comes from ``meta.json``. Either way the driver keeps row
numbers, never records or token ids, and each worker reads the rows of its own micro-batches
(``FeatureTable``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time

from unipipe_ray.core import storage
from unipipe_ray.data.cache import Shard, key_of, key_parts, line_offsets, plan_shards, select_rows, tokenize_shard
from unipipe_ray.data.table import FeatureTable

log = logging.getLogger(__name__)

# ``auto`` tokenizes on Ray Data above these sizes; below them the driver is done before Ray Data has started.
AUTO_BYTES = 8 << 20
AUTO_SHARDS = 2


def cache_root(data, output_dir, storage_uri: str | None = None) -> str:
    """``data.cache_dir``; else ``data_cache`` under the stage's storage URI; else beside the stage's output
    directory (one cache for the stages of a chained run)."""
    if data.cache_dir:
        return data.cache_dir if storage.is_uri(data.cache_dir) else os.path.abspath(data.cache_dir)
    if storage_uri:
        return storage.join(storage_uri, "data_cache")
    return os.path.join(os.path.dirname(os.path.abspath(output_dir)), "data_cache")


def prepare_stage_data(data, kind: str, tokenizer, root: str, address: str | None = None,
                       executor: str | None = None):
    """(train FeatureTable, held-out FeatureTable, info) for a stage; info says whether the cache was reused,
    where it is, how long tokenizing took, and the sources' SHA-256s (``files``, for the resume check)."""
    started = time.time()
    parts = key_parts(data, kind, tokenizer)  # hashes every source file: once per stage start
    where = storage.join(root, key_of(kind, parts))
    meta = _read_meta(where)
    if meta is not None and not data.sources:  # a task's shards are not rebuilt (or its examples made) to reuse
        shards = [Shard(i, 0) for i in range(len(meta["stats"]))]
    else:
        shards = plan_shards(data, kind)
    files = [storage.join(where, f"shard-{sh.index:05d}.arrow") for sh in shards]
    reused = meta is not None and len(meta["stats"]) == len(shards)
    executor = executor or data.tokenize_with
    if not reused:
        if executor == "auto":
            executor = "ray_data" if _big(shards) else "driver"
        args = (kind, tokenizer, data.max_length, data.max_prompt_length, data.on_bad_record)
        stats = _on_ray_data(shards, args, files, address) if executor == "ray_data" else _here(shards, args, files)
        failed = any(st["fatal"] for st in stats) or (data.on_bad_record == "error" and
                                                     any(st["first_parse_error"] for st in stats))
        meta = {"key": parts, "stats": stats, "executor": executor,
                "seconds": round(time.time() - started, 2)}
        if not failed:  # select_rows raises the error below; an errored read is not worth keeping
            storage.write_text(storage.join(where, "meta.json"), json.dumps(meta))
    train_rows, eval_rows, info = select_rows(data, kind, shards, meta["stats"])
    stats = sorted(meta["stats"], key=lambda s: s["index"])
    counts = [st["rows"] for st in stats]
    offsets = line_offsets(shards, stats)
    offsets = [offsets[sh.index] for sh in shards]
    info.update(cache=where, reused=reused, executor=None if reused else executor, files=parts["files"],
                seconds=round(time.time() - started, 2))
    log.info("%s data: %s %d records in %d shard(s) at %s (%.1f s)", kind,
             "reused the tokenized" if reused else f"tokenized ({executor})", info["records"], len(shards), where,
             info["seconds"])
    view = lambda rows: FeatureTable(files, counts, rows, kind, offsets)  # noqa: E731
    return view(train_rows), view(eval_rows), info


def _big(shards) -> bool:
    size = 0
    for sh in shards:
        if sh.path is None:
            size += 200 * len(sh.examples)  # about the bytes of a short task example
        elif os.path.isfile(sh.path):
            size += (sh.span[1] - sh.span[0]) if sh.span else os.path.getsize(sh.path)
    return size >= AUTO_BYTES and len(shards) >= AUTO_SHARDS


def _here(shards, args, files) -> list[dict]:
    return [tokenize_shard(sh, *args, target) for sh, target in zip(shards, files, strict=True)]


def _on_ray_data(shards, args, files, address) -> list[dict]:
    """One Ray Data task per shard (1 CPU each); a row carries the pickled shard in, its stats as JSON out."""
    import ray.data

    from unipipe_ray.runtime.cluster import init_ray

    init_ray(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the stage logs one line when done; bars would flood a job's log

    def tokenize(row: dict) -> dict:
        shard, target = pickle.loads(row["shard"])
        return {"stats": json.dumps(tokenize_shard(shard, *args, target))}

    items = [{"shard": pickle.dumps((sh, target))} for sh, target in zip(shards, files, strict=True)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(tokenize, num_cpus=1)
    return [json.loads(row["stats"]) for row in ds.take_all()]


def _read_meta(where: str) -> dict | None:
    text = storage.read_text(storage.join(where, "meta.json"))
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:  # a damaged index: rebuild over it
        log.warning("%s/meta.json is damaged: tokenizing again", where)
        return None
    return meta if isinstance(meta, dict) and "stats" in meta else None
