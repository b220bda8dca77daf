"""The sweep report: ``sweep_report.md`` + PNGs from a Tune experiment directory (plain files, no Ray needed).

Allocation sweeps (docs/allocation.md; params ``budget`` N and ``sft_ratio`` r, over ``seed``s): the metric per
(N, r) with a 95% interval over seeds, the best r per budget, iso-performance (the smallest budget whose best
split reaches a given (N, r)) and the cold start (format misses at r = 0). Any other search (SamS settings,
``dpo.keep_ratio``, ...): the best configuration and the metric grouped by each searched parameter's values.

The trials are read by trials.py, the statistics are analysis.py; this module draws and writes.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

from unipipe_ray.eval.stats import format_ci
from unipipe_ray.runtime.files import write_text_atomic
from unipipe_ray.tune.analysis import (
    best_config,
    best_split,
    cold_start,
    group_by,
    is_split,
    iso_performance,
    mode_sign,
    searched_params,
    split_cells,
)
from unipipe_ray.tune.trials import STOPPED, UNFINISHED, finished, is_number, load_trials


@contextmanager
def _figure(path: Path, size=(6, 4)):
    """An Agg figure's axes, saved to ``path`` and closed on exit (files only: no display on the cluster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    yield ax
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)



def _errorbar(ax, xs, cells: list[dict], **kw) -> None:
    """Means with their interval as error bars (none where the interval is unknown)."""
    low = [c["mean"] - c["low"] if is_number(c["low"]) else 0.0 for c in cells]
    high = [c["high"] - c["mean"] if is_number(c["high"]) else 0.0 for c in cells]
    ax.errorbar(xs, [c["mean"] for c in cells], yerr=[low, high], marker="o", capsize=3, **kw)



def plot_ratio(cells: dict[tuple, dict], metric: str, path: Path) -> None:
    """The metric against the SFT share r, one line per budget."""
    with _figure(path) as ax:
        for budget in sorted({b for b, _ in cells}):
            rs = sorted(r for b, r in cells if b == budget)
            _errorbar(ax, rs, [cells[(budget, r)] for r in rs], label=f"N={budget}")
        ax.set(xlabel="SFT share r of the budget", ylabel=metric, title=f"{metric} by split (95% intervals)")
        ax.legend(fontsize=8)



def plot_iso(cells: dict[tuple, dict], best: dict, metric: str, path: Path) -> None:
    """The metric against the budget (log2), one line per r, and the best split's envelope."""
    with _figure(path) as ax:
        for r in sorted({r for _, r in cells}):
            bs = sorted(b for b, rr in cells if rr == r)
            ax.plot(bs, [cells[(b, r)]["mean"] for b in bs], marker="o", alpha=0.7, label=f"r={r:g}")
        ax.plot(sorted(best), [best[b]["mean"] for b in sorted(best)], "k--", linewidth=2.5, label="best split")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(best), [str(b) for b in sorted(best)])  # budgets as numbers, not powers of 2
        ax.set(xlabel="budget N (log2)", ylabel=metric, title=f"{metric}: iso-performance across budgets")
        ax.legend(fontsize=8)



def plot_param(cells: list[dict], labels: list, param: str, metric: str, path: Path) -> None:
    """The metric per value of one searched parameter (categorical x, so strings and numbers alike)."""
    with _figure(path, (5, 3.5)) as ax:
        _errorbar(ax, range(len(cells)), cells)
        ax.set_xticks(range(len(cells)), [str(v) for v in labels])
        ax.set(xlabel=param, ylabel=metric, title=f"{metric} by {param}")



def _ci(c: dict) -> str:
    ok = is_number(c.get("low")) and is_number(c.get("high"))
    return format_ci(c["mean"], c["low"], c["high"]) if ok else f"{c['mean']:.3f}"



def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda x: "" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(map(cell, row))} |" for row in rows), ""]



def _label(r: dict) -> str:
    return r["metrics"].get("trial_id") or r["trial"]



def trial_table(records: list[dict], metric: str, keys: list[str]) -> list[str]:
    """Every trial (errored and unfinished ones included) with the parameters ``keys``."""
    rows = []
    for r in records:
        m = r["metrics"]
        cis = [_ci({"mean": m[k], "low": m.get(f"{k}_low"), "high": m.get(f"{k}_high")}) if is_number(m.get(k)) else ""
               for k in (metric, "pref_accuracy")]
        rows.append([_label(r), *(r["params"].get(k) for k in keys), cis[0], m.get("format_miss"), cis[1],
                     m.get("stage"), r["status"], m.get("seconds")])
    return _table(["trial", *keys, metric, "format_miss", "pref_accuracy", "stage", "status", "seconds"], rows)



def _split_section(cells: dict, best: dict, metric: str) -> list[str]:
    verdict = {True: "yes", False: "no (intervals overlap)", None: "unknown (no interval)"}
    return [f"## {metric} by split (mean over seeds, 95% t-interval; one seed: its own bootstrap interval)", "",
            f"![{metric} by split](sweep_ratio.png)", "",
            *_table(["budget", "r", metric, "seeds", "format_miss"],
                    [[b, r, _ci(c), c["n"], c["format_miss"]] for (b, r), c in cells.items()]),
            "## Best split per budget", "",
            *_table(["budget", "best r", metric, "runner-up r", "clearly ahead"],
                    [[b, e["r"], _ci(e), e["runner_up"], verdict[e["clear"]]] for b, e in best.items()])]



def _iso_section(cells: dict, best: dict, metric: str, mode: str) -> list[str]:
    iso = iso_performance(cells, best, mode)
    said = [f"- budget {x['match_budget']} at r={x['match_r']:g} ({x['match_mean']:.3f}) matches budget "
            f"{x['budget']} at r={x['r']:g} ({x['mean']:.3f})" for x in iso if x["match_budget"] < x["budget"]]
    lines = ["## Iso-performance (the smallest budget whose best split reaches each (budget, r))", "",
             *(said or ["- no smaller budget matches any (budget, r)"]), "", "![iso-performance](sweep_iso.png)", "",
             *_table(["budget", "r", metric, "matched by budget", "at r", f"its {metric}"],
                     [[x["budget"], x["r"], f"{x['mean']:.3f}", x["match_budget"], x["match_r"],
                       f"{x['match_mean']:.3f}"] for x in iso])]
    cold = cold_start(cells)
    return lines + (["## Cold start (share of answers missing the `#### n` line)", "",
                     *(f"- budget {x['budget']}: format_miss {x['miss_r0']:.3f} at r=0 vs {x['miss_r']:.3f} at "
                       f"r={x['r']:g}" for x in cold), ""] if cold else [])



def _generic_section(records: list[dict], metric: str, mode: str, out: Path) -> list[str]:
    params, c = best_config(records, metric, mode)
    text = ", ".join(f"{k}={v}" for k, v in params.items()) or "(no parameters)"
    lines = [f"Best configuration (over {c['n']} seed(s)): `{text}`: {metric} {_ci(c)}", ""]
    for p in searched_params(records):
        groups = group_by(records, metric, lambda r, p=p: json.dumps(r["params"].get(p)))  # hashable for any value
        values = {k: json.loads(k) for k in groups}
        order = sorted(groups, key=lambda k: (not is_number(values[k]), values[k] if is_number(values[k]) else k))
        name = "sweep_param_" + re.sub(r"[^A-Za-z0-9_.-]", "-", p) + ".png"
        plot_param([groups[k] for k in order], [values[k] for k in order], p, metric, out / name)
        lines += [f"## {metric} by `{p}`", "", f"![{p}]({name})", "",
                  *_table([p, metric, "trials"], [[str(values[k]), _ci(groups[k]), groups[k]["n"]] for k in order])]
    return lines



def write_sweep_report(exp_dir, metric: str = "accuracy", mode: str = "max", out_dir=None) -> Path:
    """Write ``sweep_report.md`` and its PNGs (sweep_ratio.png + sweep_iso.png for an allocation sweep, else
    sweep_param_<key>.png) into ``out_dir`` (default: the experiment directory); return the markdown's path."""
    mode_sign(mode)
    records = load_trials(exp_dir)
    out = Path(out_dir) if out_dir is not None else Path(exp_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = {s: sum(r["status"] == s for r in records) for s in ("done", "error", STOPPED, UNFINISHED)}
    keys = {k for r in records for k in r["params"]}
    varied = sorted(set(searched_params(records)) | (keys & {"seed"}))  # the table's columns; the rest is fixed
    fixed = {k: v for k, v in records[0]["params"].items() if k not in varied}
    lines = [f"# Sweep report: {Path(exp_dir).resolve().name}", "",
             f"{len(records)} trials: {count['done']} finished, {count['error']} errored, {count[STOPPED]} stopped "
             f"early by the scheduler, {count[UNFINISHED]} "
             f"running or unfinished; {len(finished(records, metric))} finished with `{metric}` are analysed "
             f"({mode} is best; intervals are 95%). Fixed: {', '.join(f'{k}={v}' for k, v in fixed.items()) or '-'}.",
             ""]
    if not finished(records, metric):
        lines += [f"No finished trial reports `{metric}`.", ""]
    elif any(is_split(r) for r in finished(records, metric)):
        cells = split_cells(records, metric)
        best = best_split(cells, mode)
        plot_ratio(cells, metric, out / "sweep_ratio.png")
        plot_iso(cells, best, metric, out / "sweep_iso.png")
        lines += _split_section(cells, best, metric) + _iso_section(cells, best, metric, mode)
    else:
        lines += _generic_section(records, metric, mode, out)
    notes = [f"- `{_label(r)}` ({r['status']}): {r['note']}" for r in records if r["note"]]
    lines += ["## Trials", "", *trial_table(records, metric, varied), *(["Problems:", "", *notes, ""] if notes else [])]
    path = out / "sweep_report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
