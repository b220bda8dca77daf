"""Load checked examples from one or more sources, with an explicit bad-record policy and a weighted mixture.

    examples, report = load_examples("preference", [("hh.jsonl.gz", 1.0), ("math.jsonl", 0.5)], seed=0)

on_bad_record="error" raises the first DataError; "skip" counts skipped records by kind in the report and
logs a warning. Nothing is dropped silently: the report also says what the mixture subsampled or repeated.
"""
from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from unipipe_ray.data.readers import iter_raw
from unipipe_ray.data.records import DataError, parse_preference, parse_prompt, parse_sft

log = logging.getLogger(__name__)

PARSERS = {"sft": parse_sft, "preference": parse_preference, "prompt": parse_prompt}
POLICIES = ("error", "skip")


@dataclass
class LoadReport:
    total: int = 0  # records read from all sources (bad ones included)
    skipped_by_kind: Counter = field(default_factory=Counter)  # DataError.kind -> count
    first_skipped: str | None = None  # location of the first skipped record: where to start looking
    notes: list[str] = field(default_factory=list)  # what the mixture took from each source

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_kind.values())

    @property
    def kept(self) -> int:
        return self.total - self.skipped

    def skip(self, error: DataError) -> None:
        self.skipped_by_kind[error.kind] += 1
        self.first_skipped = self.first_skipped or error.loc

    def summary(self) -> str:
        if self.skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.skipped_by_kind.most_common())
            text = f"skipped {self.skipped} of {self.total} records: {kinds} (first: {self.first_skipped})"
        else:
            text = f"kept all {self.total} records"
        return "; ".join([text, *self.notes])


def load_examples(kind: str, sources, *, on_bad_record: str = "error", seed: int = 0,
                  size: int | None = None):
    """Read, check and mix examples. Returns (examples, LoadReport).

    sources: a sequence of (path, weight); a bare path means one source of weight 1. Weights are relative
    shares of the result. One source without `size`: all its records, in file order. Otherwise a seeded,
    shuffled mixture: without `size` the largest one that repeats no source; with `size`, sources are
    subsampled or repeated to reach their shares (the report says which).
    """
    parse = _choice(kind, PARSERS, "kind")
    _choice(on_bad_record, dict.fromkeys(POLICIES), "on_bad_record")
    sources = _check_sources(sources)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    report = LoadReport()
    pools = [read_records(path, parse, on_bad_record, report) for path, _ in sources]
    for (path, _), pool in zip(sources, pools, strict=True):
        if not pool:
            raise DataError(f"no usable records ({report.summary()})", "no_records", os.fspath(path))
    if len(pools) == 1 and size is None:
        examples = pools[0]
    else:
        names = [os.fspath(p) for p, _ in sources]
        examples = _mix(pools, [w for _, w in sources], names, size, seed, report)
    if report.skipped:
        log.warning("load_examples(%s): %s", kind, report.summary())
    return examples, report


def read_records(path, parse: Callable, on_bad_record: str, report: LoadReport) -> list:
    """Parse every record of one source with `parse(raw, loc)`, applying the bad-record policy."""
    out = []
    for loc, raw in iter_raw(path):
        report.total += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            out.append(parse(raw, loc))
        except DataError as e:
            if on_bad_record == "error":
                raise
            report.skip(e)
    return out


def _mix(pools: list[list], weights: list[float], names: list[str], size, seed: int, report: LoadReport):
    rng = random.Random(seed)
    shares = [w / sum(weights) for w in weights]
    if size is None:
        # The scarcest source relative to its share sets the size.
        size = min(math.floor(len(pool) / share) for pool, share in zip(pools, shares, strict=True))
        # min() only guards against float round-up taking one record too many.
        counts = [min(n, len(pool)) for n, pool in zip(apportion(size, shares), pools, strict=True)]
    else:
        counts = apportion(size, shares)
    mixture = []
    for pool, n, name in zip(pools, counts, names, strict=True):
        mixture.extend(_draw(pool, n, rng))
        how = "repeated" if n > len(pool) else "subsampled" if n < len(pool) else "all"
        report.notes.append(f"{name}: {n} of {len(pool)} ({how}, x{n / len(pool):.2f})")
    rng.shuffle(mixture)
    return mixture


def apportion(total: int, shares: Sequence[float]) -> list[int]:
    """Split `total` into integer counts proportional to `shares` (largest-remainder method)."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(pool: list, n: int, rng: random.Random) -> list:
    """n items from pool: whole copies while n exceeds it, then a sample without replacement."""
    copies, rest = divmod(n, len(pool))
    return pool * copies + rng.sample(pool, rest)


def _check_sources(sources) -> list[tuple]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [(sources, 1.0)]
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty: give at least one (path, weight)")
    for source in sources:
        if not (isinstance(source, (tuple, list)) and len(source) == 2):
            raise ValueError(f"each source must be a (path, weight) pair, got {source!r}")
        weight = source[1]
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not number or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"source {os.fspath(source[0])}: weight must be a finite number > 0, "
                             f"got {weight!r}")
    return [tuple(s) for s in sources]


def _choice(value: str, options: dict, name: str):
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(options)}")
    return options[value]
