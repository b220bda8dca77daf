"""The sweep report: ``sweep_report.md`` + PNGs from a Tune experiment directory (plain files, no Ray needed).

Allocation sweeps (ALLOCATION.md; params ``budget`` N and ``sft_ratio`` r, over ``seed``s): the metric per
(N, r) with a 95% interval over seeds, the best r per budget, iso-performance (the smallest budget whose best
split reaches a given (N, r)) and the cold start (format misses at r = 0). Any other search (SamS settings,
``dpo.keep_ratio``, ...): the best configuration and the metric grouped by each searched parameter's values.

Layout read (Tune 2.x): ``<exp>/<trial>/{params.json, result.json (JSON lines, the last is the final result),
error.txt}`` and ``<exp>/experiment_state-*.json`` for trial statuses; a directory without params.json (the
trainable's ``stages/``) is not a trial.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from unipipe_ray.eval.stats import format_ci
from unipipe_ray.runtime.files import write_text_atomic

STATES = {"TERMINATED": "done", "ERROR": "error"}  # Tune's trial status -> ours; any other is unfinished
UNFINISHED = "running/unfinished"
STOPPED = "stopped early"  # ended by the scheduler: its last result is not the final one, so not analysed
# Two-sided 95% Student t quantiles, 1-10 degrees of freedom (seeds are few; scipy is not a dependency).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(df: int) -> float:
    """The 97.5% t quantile: the table, beyond it the Cornish-Fisher expansion (within 0.003 at df = 11)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _read_results(path: Path) -> tuple[list[dict], str | None]:
    """The parsable lines of result.json and a note on what was wrong: a trial killed mid-write leaves a
    partial last line, which must not sink the whole report."""
    if not path.is_file():
        return [], "no result.json"
    rows, bad = [], 0
    for line in filter(str.strip, path.read_text(errors="replace").splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    rows = [r for r in rows if isinstance(r, dict)]
    return rows, f"{bad} corrupt line(s) in result.json skipped" if bad else None if rows else "empty result.json"


def _tune_statuses(exp: Path) -> dict[str, str]:
    """{trial dir name: Tune status} from the newest experiment_state-*.json ({} when absent or unreadable).
    Needed because a function trial that returns normally never logs ``done: true`` in result.json."""
    # Newest by the start time in the name: a restored run may touch the older files too, so mtimes tie or lie.
    files = sorted(exp.glob("experiment_state-*.json"), key=lambda p: p.name)
    try:
        states = [json.loads(t[0]) for t in json.loads(files[-1].read_text())["trial_data"]] if files else []
        return {s["relative_logdir"]: s["status"] for s in states if s.get("relative_logdir")}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def load_trials(exp_dir) -> list[dict]:
    """One record per trial directory: {"trial", "params", "metrics" (last result line without "config"),
    "history" (every line), "status" ("done" | "error" | "stopped early" | "running/unfinished"), "note"}.
    The status comes from Tune's experiment state; without it, error.txt means "error" and results "done"."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"experiment directory {exp} does not exist")
    states, records = _tune_statuses(exp), []
    for d in sorted(p for p in exp.iterdir() if (p / "params.json").is_file()):
        try:
            params = json.loads((d / "params.json").read_text())
        except ValueError:
            params = {}
        history, note = _read_results(d / "result.json")
        error = d / "error.txt"
        status = STATES.get(states[d.name], UNFINISHED) if d.name in states else "error" if error.is_file() else "done"
        if status == "done" and not history:
            status = UNFINISHED  # nothing to report is never a finished trial
        elif status == "done" and history[-1].get("final") is False:
            status = STOPPED  # a scheduler (ASHA) ended it before its last stage's final evaluation
        if status == "error" and error.is_file():  # the exception line, e.g. "RuntimeError: CUDA out of memory"
            note = ([ln.strip() for ln in error.read_text(errors="replace").splitlines() if ln.strip()] or [""])[-1]
        metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "config"}
        records.append({"trial": d.name, "params": params, "metrics": metrics, "history": history,
                        "status": status, "note": note and note[:200]})
    if not records:
        raise ValueError(f"{exp} holds no Tune trials (no subdirectory with a params.json)")
    return records


# ---------------------------------------------------------------- analysis (plain data in, plain data out)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sign(mode: str) -> int:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    return 1 if mode == "max" else -1


def finished(records: list[dict], metric: str) -> list[dict]:
    """The trials that count: done, with a numeric metric (an errored trial's last line is an earlier stage)."""
    return [r for r in records if r["status"] == "done" and _num(r["metrics"].get(metric))]


def mean_interval(values: list[float], own: tuple = (None, None)) -> dict:
    """{"mean", "low", "high", "n"}: the mean over seeds with its 95% t-interval; with one seed, ``own``
    (the trial's bootstrap interval over held-out examples) or NaN bounds."""
    n, mean = len(values), statistics.fmean(values)
    if n > 1:
        half = t975(n - 1) * statistics.stdev(values) / math.sqrt(n)
        return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}
    low, high = own if all(_num(x) for x in own) else (math.nan, math.nan)
    return {"mean": mean, "low": low, "high": high, "n": 1}


def group_by(records: list[dict], metric: str, key) -> dict:
    """{key(record): mean_interval + "format_miss" (mean over seeds, or None)} of the finished trials."""
    groups, out = defaultdict(list), {}
    for r in finished(records, metric):
        groups[key(r)].append(r["metrics"])
    for k, ms in groups.items():
        out[k] = mean_interval([m[metric] for m in ms], (ms[0].get(f"{metric}_low"), ms[0].get(f"{metric}_high")))
        misses = [m["format_miss"] for m in ms if _num(m.get("format_miss"))]
        out[k]["format_miss"] = statistics.fmean(misses) if misses else None
    return out


def _is_split(r: dict) -> bool:
    return "budget" in r["params"] and "sft_ratio" in r["params"]


def split_cells(records: list[dict], metric: str) -> dict[tuple, dict]:
    """{(budget, r): {"mean", "low", "high", "n", "format_miss"}} over the seeds, sorted by budget then r."""
    key = lambda r: (r["params"]["budget"], float(r["params"]["sft_ratio"]))
    return dict(sorted(group_by([r for r in records if _is_split(r)], metric, key).items()))


def best_split(cells: dict[tuple, dict], mode: str = "max") -> dict:
    """{budget: {"r", "mean", "low", "high", "runner_up", "clear"}}: the best r (ties keep the smaller r) and
    whether its interval clears the runner-up's: True, False (they overlap) or None (no runner-up/interval)."""
    sign, out = _sign(mode), {}
    for budget in sorted({b for b, _ in cells}):
        ranked = sorted(((r, c) for (b, r), c in cells.items() if b == budget), key=lambda rc: -sign * rc[1]["mean"])
        (r, c), runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        clear = None
        if runner and all(_num(x) for x in (c["low"], c["high"], runner[1]["low"], runner[1]["high"])):
            clear = c["low"] > runner[1]["high"] if sign > 0 else c["high"] < runner[1]["low"]
        out[budget] = {"r": r, "mean": c["mean"], "low": c["low"], "high": c["high"],
                       "runner_up": runner and runner[0], "clear": clear}
    return out


def iso_performance(cells: dict[tuple, dict], best: dict, mode: str = "max") -> list[dict]:
    """For each (N, r): the smallest budget N' whose best split reaches at least that mean (N' <= N, as N's
    own best split does). Rows {"budget", "r", "mean", "match_budget", "match_r", "match_mean"}."""
    sign, rows = _sign(mode), []
    for (budget, r), c in cells.items():
        match = min(b for b, e in best.items() if sign * e["mean"] >= sign * c["mean"])
        rows.append({"budget": budget, "r": r, "mean": c["mean"], "match_budget": match,
                     "match_r": best[match]["r"], "match_mean": best[match]["mean"]})
    return rows


def cold_start(cells: dict[tuple, dict]) -> list[dict]:
    """Per budget with r = 0: format_miss there vs at the smallest r > 0 (0.1 in ALLOCATION.md's grid)."""
    rows = []
    for budget in sorted({b for b, r in cells if r == 0}):
        above = sorted(r for b, r in cells if b == budget and r > 0)
        if above and None not in (cells[(budget, 0.0)]["format_miss"], cells[(budget, above[0])]["format_miss"]):
            rows.append({"budget": budget, "r": above[0], "miss_r0": cells[(budget, 0.0)]["format_miss"],
                         "miss_r": cells[(budget, above[0])]["format_miss"]})
    return rows


def searched_params(records: list[dict]) -> list[str]:
    """The parameters whose value differs between trials (seed excluded: it is replication, not a setting)."""
    keys = sorted({k for r in records for k in r["params"]} - {"seed"})
    return [k for k in keys if len({json.dumps(r["params"].get(k)) for r in records}) > 1]


def best_config(records: list[dict], metric: str, mode: str = "max") -> tuple[dict, dict] | None:
    """(params without seed, its group_by entry over seeds) of the best configuration; None if none finished."""
    sign = _sign(mode)
    groups = group_by(records, metric, lambda r: json.dumps({k: v for k, v in r["params"].items() if k != "seed"},
                                                            sort_keys=True))
    best = max(groups, key=lambda g: sign * groups[g]["mean"], default=None)
    return (json.loads(best), groups[best]) if best else None


# ---------------------------------------------------------------- plots


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
    low = [c["mean"] - c["low"] if _num(c["low"]) else 0.0 for c in cells]
    high = [c["high"] - c["mean"] if _num(c["high"]) else 0.0 for c in cells]
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


# ---------------------------------------------------------------- markdown


def _ci(c: dict) -> str:
    ok = _num(c.get("low")) and _num(c.get("high"))
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
        cis = [_ci({"mean": m[k], "low": m.get(f"{k}_low"), "high": m.get(f"{k}_high")}) if _num(m.get(k)) else ""
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
        order = sorted(groups, key=lambda k: (not _num(values[k]), values[k] if _num(values[k]) else k))
        name = "sweep_param_" + re.sub(r"[^A-Za-z0-9_.-]", "-", p) + ".png"
        plot_param([groups[k] for k in order], [values[k] for k in order], p, metric, out / name)
        lines += [f"## {metric} by `{p}`", "", f"![{p}]({name})", "",
                  *_table([p, metric, "trials"], [[str(values[k]), _ci(groups[k]), groups[k]["n"]] for k in order])]
    return lines


def write_sweep_report(exp_dir, metric: str = "accuracy", mode: str = "max", out_dir=None) -> Path:
    """Write ``sweep_report.md`` and its PNGs (sweep_ratio.png + sweep_iso.png for an allocation sweep, else
    sweep_param_<key>.png) into ``out_dir`` (default: the experiment directory); return the markdown's path."""
    _sign(mode)
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
    elif any(_is_split(r) for r in finished(records, metric)):
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
