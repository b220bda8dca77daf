"""Per-example scores -> figures with intervals, paired comparisons, and the markdown table of a report.

An *entry* is the record every evaluation figure becomes:

    {"estimate": float, "low": float, "high": float, "n": int, "scores": [float, ...], ...}

``scores`` are the per-example values behind the estimate (what a paired test needs); figures that are not
a mean of per-example values (corpus BLEU) carry no ``scores`` and are left out of comparisons. Entries of
0/1 outcomes (exact match) carry ``"binary": True``, which makes their comparisons use McNemar's test. A
comparison
of B against a baseline A is

    {"diff": B - A, "low": float, "high": float, "p_value": float, "test": str, "significant": bool}

numpy and the standard library only (no torch): the pipeline report can import it anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from unipipe_ray.eval import stats

BLEU_ORDER = 4


def entry(scores: Sequence[float], n_resamples: int = 2000, seed: int = 0, binary: bool = False, **extra) -> dict:
    """Mean of ``scores`` with its 95% percentile bootstrap interval (stats.bootstrap_ci), plus ``extra``.
    binary=True marks 0/1 outcomes (and checks that they are)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no scores to summarise")
    if binary and not _is_binary(values):
        raise ValueError("binary=True but the scores are not all 0 or 1")
    est, low, high = stats.bootstrap_ci(values, np.mean, n_resamples=n_resamples, seed=seed)
    out = {"estimate": est, "low": low, "high": high, "n": int(values.size), "scores": values.tolist(), **extra}
    return out | {"binary": True} if binary else out


def bleu_from_stats(stats_sum: np.ndarray) -> np.ndarray:
    """Corpus BLEU (Papineni et al. 2002; sacrebleu's 'none' smoothing) from summed sentence statistics.

    stats_sum (..., 2 + 2 * 4): [sys_len, ref_len, correct_1..4, total_1..4] -> (...) BLEU in 0-100.
    BLEU = BP * exp(mean_n log(correct_n / total_n)), BP = min(1, exp(1 - ref_len / sys_len)); 0 if any
    order has no match (log 0), and 0 for an empty system output.
    """
    stats_sum = np.asarray(stats_sum, dtype=np.float64)
    sys_len, ref_len = stats_sum[..., 0], stats_sum[..., 1]
    correct, total = stats_sum[..., 2:2 + BLEU_ORDER], stats_sum[..., 2 + BLEU_ORDER:]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_precision = np.where(correct > 0, np.log(np.where(correct > 0, correct, 1) / np.maximum(total, 1)),
                                 -np.inf)
        brevity = np.where(sys_len < ref_len, 1 - ref_len / np.maximum(sys_len, 1), 0.0)
        score = 100 * np.exp(brevity + log_precision.mean(-1))
    return np.where((sys_len > 0) & np.isfinite(score), score, 0.0)


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(N, 10) per-sentence BLEU statistics from sacrebleu (13a tokens): sums over any subset of rows give
    that subset's corpus BLEU through ``bleu_from_stats``."""
    import sacrebleu

    rows = []
    for p, r in zip(predictions, references, strict=True):
        s = sacrebleu.sentence_bleu(p, [r])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2 + 2 * BLEU_ORDER)


def corpus_bleu_entry(predictions: Sequence[str], references: Sequence[str], n_resamples: int = 2000,
                      seed: int = 0) -> dict:
    """Corpus BLEU with a bootstrap interval over examples (Koehn 2004): resample sentences, pool their
    n-gram statistics, recompute BLEU. No ``scores``: corpus BLEU is not a mean of per-example values."""
    table = bleu_stats(predictions, references)

    def corpus(index_rows, axis=-1):  # (n,) or (m, n) resampled example indices -> () or (m,); axis is -1
        idx = np.asarray(index_rows, dtype=np.int64)
        # One statistic at a time: gathering all 10 at once would hold a (m, n, 10) array.
        return bleu_from_stats(np.stack([table[:, j][idx].sum(axis) for j in range(table.shape[1])], -1))

    est, low, high = stats.bootstrap_ci(np.arange(len(table)), corpus, n_resamples=n_resamples, seed=seed)
    return {"estimate": est, "low": low, "high": high, "n": len(table)}


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0.0) | (values == 1.0)))


def compare_scores(scores_a: Sequence[float], scores_b: Sequence[float], alpha: float = 0.05,
                   n_resamples: int = 2000, seed: int = 0, binary: bool | None = None) -> dict:
    """B against baseline A on the same examples: mean difference B - A with a paired bootstrap interval.
    p-value: McNemar's test for 0/1 outcomes (exact match), else the paired bootstrap's (Dror et al. 2018
    recommend these for these two kinds of metric). binary=None: 0/1 when every score is 0 or 1."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    boot = stats.paired_bootstrap(a, b, confidence=1 - alpha, n_resamples=n_resamples, seed=seed)
    if binary is None:
        binary = _is_binary(a) and _is_binary(b)
    if binary:
        p, test = stats.mcnemar(a, b)["p_value"], "mcnemar"
    else:
        p, test = boot["p_value"], "paired_bootstrap"
    return {"diff": boot["diff"], "low": boot["low"], "high": boot["high"], "p_value": p, "test": test,
            "significant": stats.significant(p, alpha)}


def compare(result_a: dict, result_b: dict, alpha: float = 0.05, n_resamples: int = 2000, seed: int = 0) -> dict:
    """{metric: compare_scores} for every metric both results hold per-example scores of, on the same
    number of examples. Metrics without scores (corpus BLEU) or of different sizes are skipped."""
    out = {}
    for metric, a in result_a.items():
        b = result_b.get(metric)
        if b is None or "scores" not in a or "scores" not in b or len(a["scores"]) != len(b["scores"]):
            continue
        binary = bool(a.get("binary") and b.get("binary"))
        out[metric] = compare_scores(a["scores"], b["scores"], alpha, n_resamples, seed, binary)
    return out


def without_scores(result: dict) -> dict:
    """The result with every entry's per-example ``scores`` dropped (for compact JSON and tables)."""
    return {metric: {k: v for k, v in e.items() if k != "scores"} for metric, e in result.items()}


def _cell(e: dict, digits: int) -> str:
    if any(isinstance(e.get(k), float) and math.isnan(e[k]) for k in ("estimate", "low", "high")):
        return "n/a"
    return stats.format_ci(e["estimate"], e["low"], e["high"], digits)


def markdown_table(results: dict[str, dict], baseline: str | None = None, alpha: float = 0.05,
                   digits: int = 3, n_resamples: int = 2000, seed: int = 0) -> str:
    """One row per metric, one column per model (``results``: {model name: result}); estimates with their
    95% intervals. With ``baseline``, every other model's cell adds its difference to the baseline and
    the p-value; differences with p >= alpha are marked "n.s." (not significant)."""
    names = list(results)
    metrics = list(dict.fromkeys(m for r in results.values() for m in r))
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in metrics:
        cells = []
        for name in names:
            e = results[name].get(metric)
            cell = "" if e is None else _cell(e, digits)
            if baseline is not None and name != baseline and e is not None and metric in results[baseline]:
                c = compare(results[baseline], {metric: e}, alpha, n_resamples, seed).get(metric)
                if c is not None:
                    mark = "" if c["significant"] else ", n.s."
                    cell += f" ({c['diff']:+.{digits}f}, p={c['p_value']:.3g}{mark})"
            cells.append(cell)
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
