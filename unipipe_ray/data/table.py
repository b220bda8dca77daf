"""Tokenized features on disk (Arrow IPC files), read a row at a time: what a worker holds is its rows.

A cached dataset is a list of shard files, each a table of token-id columns written in record batches of
``BATCH_ROWS`` rows. ``FeatureTable`` is a view of some of their rows (a stage's training or held-out
selection, by global row number) that behaves like the list of feature dicts the stages index:
``len(t)``, ``t[i]``, ``t[a:b:c]``, ``t.take(indices)``. It pickles as paths plus the row numbers, opens the
files lazily in the process that reads them (memory-mapped when local; a URI is read through pyarrow's
filesystem one record batch at a time), and counts the rows it turned into Python (``rows_read``), so a test
can see that a worker materialised only its share.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import threading

import numpy as np

from unipipe_ray.core.storage import is_uri, open_uri

BATCH_ROWS = 256
COLUMNS = {"sft": ("input_ids", "labels"), "prompt": ("input_ids",),
           "preference": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
# Text columns beside the token ids: a prompt row keeps its example (JSON: messages, source, meta), which
# PPO's prompt feeder needs for the task's checker.
TEXT_COLUMNS = {"prompt": ("example",)}


def schema(kind: str):
    import pyarrow as pa

    return pa.schema([(c, pa.list_(pa.int32())) for c in COLUMNS[kind]]
                     + [(c, pa.string()) for c in TEXT_COLUMNS.get(kind, ())])


def write_shard(target: str, kind: str, features) -> int:
    """Write ``features`` (an iterable of dicts of token-id lists; an empty dict for a row that failed
    tokenization, kept so that row numbers stay those of the records) to ``target``, a local path or a URI,
    ``BATCH_ROWS`` at a time (a shard never sits in memory whole). Returns the row count."""
    import pyarrow as pa

    sch = schema(kind)
    partial = None
    if is_uri(target):  # an object appears only once complete
        fs, path = open_uri(target)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        sink = fs.open_output_stream(path)
    else:  # written beside and moved: two runs filling one cache entry never read each other's half files
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        partial = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
        sink = pa.OSFile(partial, "wb")
    try:
        rows = _write_batches(sink, sch, features)
    except BaseException:
        if partial is not None and os.path.exists(partial):
            os.remove(partial)
        raise
    if partial is not None:
        os.replace(partial, target)
    return rows


def _write_batches(sink, sch, features) -> int:
    import pyarrow as pa

    rows, part = 0, []
    with sink, pa.ipc.new_file(sink, sch) as writer:
        def flush():
            writer.write_batch(pa.record_batch([pa.array([f.get(c, "" if t == pa.string() else []) for f in part],
                                                         type=t) for c, t in zip(sch.names, sch.types, strict=True)],
                                               schema=sch))
        for feature in features:
            part.append(feature)
            rows += 1
            if len(part) == BATCH_ROWS:
                flush()
                part = []
        if part or not rows:
            flush()
    return rows


_RELATIVE = re.compile(r":\+(\d+)$")


def absolute_line(loc: str | None, offset: int) -> str | None:
    """``path:+N`` (line N of a .jsonl byte range) as ``path:LINE``, ``offset`` lines being before the range."""
    if loc is None:
        return None
    return _RELATIVE.sub(lambda m: f":{offset + int(m.group(1))}", loc)


class FeatureTable:
    """Rows ``rows`` (global row numbers over ``files``, whose row counts are ``counts``) as feature dicts."""

    def __init__(self, files: list[str], counts: list[int], rows, kind: str, line_offsets: list[int] | None = None):
        self.files, self.kind = list(files), kind
        self.line_offsets = list(line_offsets or [0] * len(files))  # lines before a .jsonl range, per file
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self.rows = np.asarray(rows, dtype=np.int64)
        self.rows_read = 0
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        return self.take([i])[0]

    def __iter__(self):
        for i in range(0, len(self), BATCH_ROWS):
            yield from self.take(range(i, min(i + BATCH_ROWS, len(self))))

    def take(self, indices, columns=None) -> list[dict]:
        """The feature dicts of positions ``indices`` (into this view), in that order: the token columns, or
        ``columns``."""
        out = []
        for i in indices:
            row = int(self.rows[i])
            f = self._file(row)
            local = row - self.starts[f]
            batch = self._reader(f).get_batch(local // BATCH_ROWS)
            out.append({c: batch.column(c)[local % BATCH_ROWS].as_py() for c in columns or COLUMNS[self.kind]})
        self.rows_read += len(out)
        return out

    def prompts(self, indices) -> list[tuple]:
        """(PromptExample, prompt token ids) of positions ``indices`` of a prompt table."""
        from unipipe_ray.data.records import PromptExample

        out = []
        for i, row in zip(indices, self.take(indices, ("example", "input_ids")), strict=True):
            ex = json.loads(row["example"])
            source = absolute_line(ex["source"], self.line_offsets[self._file(int(self.rows[i]))])
            out.append((PromptExample(tuple(ex["prompt"]), source, ex["meta"]), row["input_ids"]))
        return out

    def _file(self, row: int) -> int:
        return bisect.bisect_right(self.starts, row) - 1

    def _reader(self, f: int):
        import pyarrow as pa

        if f not in self._readers:
            name = self.files[f]
            if is_uri(name):
                fs, path = open_uri(name)
                source = fs.open_input_file(path)
            elif not os.path.exists(name):  # written on another node, or the cache was removed under the run
                raise FileNotFoundError(f"tokenized-data shard {name} is not on this node "
                                        f"({os.uname().nodename}): on several nodes set data.cache_dir to a "
                                        f"path every node mounts or to a URI (s3://...)")
            else:
                source = pa.memory_map(name)  # pages come in as rows are read; nothing else is resident
            self._readers[f] = pa.ipc.open_file(source)
        return self._readers[f]

    def __getstate__(self):
        return {**self.__dict__, "_readers": {}, "rows_read": 0}
