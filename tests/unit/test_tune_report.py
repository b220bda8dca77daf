"""The sweep report (tune/trials.py, analysis.py, report.py) on fake Tune experiment directories: no Ray,
values worked out by hand.

The allocation fixture: budgets 64 and 256 with seeds 0 and 1, budget 1024 with seed 0 only, r in
{0, 0.1, 1}. Final accuracy (format_miss) per seed:

    budget  r=0                      r=0.1                    r=1
    64      0.10, 0.14 (0.8, 0.6)    0.30, 0.34 (0.1, 0.1)    0.40, 0.44
    256     0.20, 0.24 (0.5, 0.3)    0.50, 0.60 (0.0, 0.0)    0.44, 0.46
    1024    0.30 [0.25, 0.35] (0.9)  0.70 [0.65, 0.75] (0.05) 0.50 [0.45, 0.55]

plus an errored trial (64, r=0.1, seed 2: its SFT line says 0.99, which must not count) and one with an
empty result.json (256, r=1, seed 2).
"""

import json
import math

import pytest

from unipipe_ray.tune.analysis import (
    best_config,
    best_split,
    cold_start,
    group_by,
    iso_performance,
    searched_params,
    split_cells,
    t975,
)
from unipipe_ray.tune.report import write_sweep_report
from unipipe_ray.tune.trials import finished, load_trials

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRID = {  # (budget, r): [(accuracy, format_miss, low, high) per seed]
    (64, 0.0): [(0.10, 0.8, None, None), (0.14, 0.6, None, None)],
    (64, 0.1): [(0.30, 0.1, None, None), (0.34, 0.1, None, None)],
    (64, 1.0): [(0.40, None, None, None), (0.44, None, None, None)],
    (256, 0.0): [(0.20, 0.5, None, None), (0.24, 0.3, None, None)],
    (256, 0.1): [(0.50, 0.0, None, None), (0.60, 0.0, None, None)],
    (256, 1.0): [(0.44, None, None, None), (0.46, None, None, None)],
    (1024, 0.0): [(0.30, 0.9, 0.25, 0.35)],
    (1024, 0.1): [(0.70, 0.05, 0.65, 0.75)],
    (1024, 1.0): [(0.50, None, 0.45, 0.55)],
}


def write_trial(exp, index, params, reports, error=None, raw=""):
    """A trial directory as Tune 2.x writes it: params.json, result.json (one JSON line per report, with
    Tune's own keys and the config), error.txt for a failed trial. Returns the directory name."""
    tag = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    d = exp / f"tune_trial_ab12c_{index:05d}_{index}_{tag}_2026-01-01_00-00-00"
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True))
    lines = [json.dumps({**m, "done": False, "training_iteration": i + 1, "trial_id": f"ab12c_{index:05d}",
                         "time_total_s": 1.5 * (i + 1), "date": "2026-01-01_00-00-05", "config": params}) + "\n"
             for i, m in enumerate(reports)]
    (d / "result.json").write_text("".join(lines) + raw)
    if error:
        (d / "error.txt").write_text(f"Failure # 1 (occurred at 2026-01-01_00-00-09)\nTraceback (most recent call "
                                     f"last):\n  File \"trainable.py\", line 9, in tune_trial\n{error}\n")
    return d.name


def final_report(budget, r, acc, miss, low, high):
    """The trial's last report: SFT when r = 1 (no preference pairs), else DPO."""
    m = {"accuracy": acc, "stage": "sft" if r == 1 else "dpo", "n_eval": 100, "seconds": 12.0,
         "sft_examples": round(budget * r), "pref_pairs": budget - round(budget * r)}
    optional = {"format_miss": miss, "accuracy_low": low, "accuracy_high": high}
    m.update({k: v for k, v in optional.items() if v is not None})
    return m


@pytest.fixture
def alloc_exp(tmp_path):
    """The allocation grid of the module docstring; trial (64, 0, seed 0) ends with a half-written line."""
    exp = tmp_path / "allocation"
    i = 0
    for (budget, r), seeds in GRID.items():
        for seed, values in enumerate(seeds):
            reports = ([{"accuracy": values[0] - 0.05, "stage": "sft"}] if 0 < r < 1 else [])
            raw = '{"accuracy": 0.9, "sta' if (budget, r, seed) == (64, 0.0, 0) else ""
            write_trial(exp, i, {"budget": budget, "sft_ratio": r, "seed": seed},
                        reports + [final_report(budget, r, *values)], raw=raw)
            i += 1
    write_trial(exp, i, {"budget": 64, "sft_ratio": 0.1, "seed": 2}, [{"accuracy": 0.99, "stage": "sft"}],
                error="RuntimeError: CUDA out of memory")
    (exp / f"tune_trial_ab12c_{i + 1:05d}_x").mkdir()
    (exp / f"tune_trial_ab12c_{i + 1:05d}_x" / "params.json").write_text('{"budget": 256, "sft_ratio": 1.0, "seed": 2}')
    (exp / f"tune_trial_ab12c_{i + 1:05d}_x" / "result.json").write_text("")
    (exp / "stages" / "budget=64_seed=0_sft_ratio=0.0").mkdir(parents=True)  # the trainable's runs: not trials
    (exp / "tuner.pkl").write_bytes(b"\x80\x04N.")
    (exp / "basic-variant-state-2026-01-01_00-00-00.json").write_text("{}")
    return exp


def by_params(records):
    return {(r["params"]["budget"], r["params"]["sft_ratio"], r["params"]["seed"]): r for r in records}


def test_load_trials_records_and_statuses(alloc_exp):
    """15 grid trials + the errored + the empty one = 17 records (stages/ has no params.json). Without an
    experiment state: error.txt -> "error" (note: the exception line), an empty result.json -> unfinished,
    a half-written last line is skipped (the trial keeps its last good line, 0.10, and a note)."""
    records = load_trials(alloc_exp)
    assert len(records) == 17
    rec = by_params(records)
    assert rec[(64, 0.1, 2)]["status"] == "error"
    assert rec[(64, 0.1, 2)]["note"] == "RuntimeError: CUDA out of memory"
    assert rec[(256, 1.0, 2)]["status"] == "running/unfinished"
    assert rec[(256, 1.0, 2)]["note"] == "empty result.json" and rec[(256, 1.0, 2)]["metrics"] == {}
    corrupt = rec[(64, 0.0, 0)]
    assert corrupt["status"] == "done" and corrupt["metrics"]["accuracy"] == 0.10 and "corrupt" in corrupt["note"]
    two = rec[(256, 0.1, 1)]
    assert len(two["history"]) == 2 and two["metrics"]["stage"] == "dpo" and "config" not in two["metrics"]
    assert two["metrics"]["accuracy"] == 0.60 and two["history"][0]["accuracy"] == pytest.approx(0.55)


def test_experiment_state_decides_the_status(alloc_exp):
    """Tune's experiment state wins over the files: a trial restored after an error and finished
    (TERMINATED, error.txt still there) is done; one still RUNNING is unfinished though it has results."""
    rec = by_params(load_trials(alloc_exp))
    errored, running = rec[(64, 0.1, 2)]["trial"], rec[(64, 1.0, 0)]["trial"]
    states = [[json.dumps({"relative_logdir": errored, "status": "TERMINATED"}), "{}"],
              [json.dumps({"relative_logdir": running, "status": "RUNNING"}), "{}"]]
    (alloc_exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": states}))
    rec = by_params(load_trials(alloc_exp))
    assert rec[(64, 0.1, 2)]["status"] == "done" and rec[(64, 1.0, 0)]["status"] == "running/unfinished"
    assert rec[(64, 0.0, 1)]["status"] == "done"  # not in the state file: the files decide


def test_missing_or_empty_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trials(tmp_path / "nope")
    (tmp_path / "exp" / "stages").mkdir(parents=True)
    with pytest.raises(ValueError, match="no Tune trials"):
        write_sweep_report(tmp_path / "exp")


def test_t_quantiles():
    """Table values for few seeds; the expansion beyond is within 0.003 of t(0.975, 30) = 2.0423."""
    assert t975(1) == 12.706 and t975(4) == 2.776
    assert t975(30) == pytest.approx(2.0423, abs=3e-3)


def test_split_cells_means_and_intervals(alloc_exp):
    """(64, 0): mean (0.10 + 0.14) / 2 = 0.12; sd = 0.02 * sqrt(2), so the t-interval is
    0.12 +- 12.706 * 0.02 = [-0.13412, 0.37412]; format_miss (0.8 + 0.6) / 2 = 0.7. (64, 0.1) keeps its two
    seeds (the errored 0.99 is out): 0.32. One seed, (1024, 0.1): the trial's own [0.65, 0.75]."""
    cells = split_cells(load_trials(alloc_exp), "accuracy")
    assert list(cells)[:3] == [(64, 0.0), (64, 0.1), (64, 1.0)] and len(cells) == 9
    c = cells[(64, 0.0)]
    assert c["mean"] == pytest.approx(0.12) and c["n"] == 2 and c["format_miss"] == pytest.approx(0.7)
    assert (c["low"], c["high"]) == pytest.approx((-0.13412, 0.37412))
    assert cells[(64, 0.1)]["mean"] == pytest.approx(0.32) and cells[(64, 0.1)]["n"] == 2
    assert cells[(256, 1.0)]["mean"] == pytest.approx(0.45) and cells[(256, 1.0)]["n"] == 2
    assert cells[(256, 1.0)]["format_miss"] is None
    c = cells[(1024, 0.1)]
    assert (c["mean"], c["low"], c["high"], c["n"]) == (0.70, 0.65, 0.75, 1)


def test_best_split_per_budget(alloc_exp):
    """64: r=1 (0.42) ahead of r=0.1 (0.32), but with two seeds the t-intervals (+-0.254 each) overlap.
    256: r=0.1 (0.55) ahead of r=1 (0.45), overlapping. 1024: r=0.1 [0.65, 0.75] clears r=1 [0.45, 0.55].
    mode="min" at 64: r=0 (0.12)."""
    cells = split_cells(load_trials(alloc_exp), "accuracy")
    best = best_split(cells)
    assert {b: (e["r"], e["runner_up"], e["clear"]) for b, e in best.items()} == {
        64: (1.0, 0.1, False), 256: (0.1, 1.0, False), 1024: (0.1, 1.0, True)}
    assert best[64]["mean"] == pytest.approx(0.42) and best[256]["mean"] == pytest.approx(0.55)
    assert best_split(cells, "min")[64]["r"] == 0.0


def test_iso_performance_by_hand(alloc_exp):
    """Best per budget: 64 -> 0.42, 256 -> 0.55, 1024 -> 0.70. (256, r=0) = 0.22 is reached by 64's best
    (0.42); (256, r=1) = 0.45 only by 256 itself (0.42 < 0.45); (1024, r=1) = 0.50 by 256 at r=0.1 (0.55);
    (1024, r=0.1) = 0.70 only by 1024."""
    cells = split_cells(load_trials(alloc_exp), "accuracy")
    rows = {(x["budget"], x["r"]): x for x in iso_performance(cells, best_split(cells))}
    assert (rows[(256, 0.0)]["match_budget"], rows[(256, 0.0)]["match_r"]) == (64, 1.0)
    assert rows[(256, 0.0)]["match_mean"] == pytest.approx(0.42)
    assert rows[(256, 1.0)]["match_budget"] == 256
    assert (rows[(1024, 1.0)]["match_budget"], rows[(1024, 1.0)]["match_r"]) == (256, 0.1)
    assert rows[(1024, 0.1)]["match_budget"] == 1024 and rows[(1024, 0.0)]["match_budget"] == 64


def test_cold_start_format_miss(alloc_exp):
    """format_miss at r=0 vs r=0.1: 64: 0.7 vs 0.1; 256: 0.4 vs 0.0; 1024: 0.9 vs 0.05."""
    rows = cold_start(split_cells(load_trials(alloc_exp), "accuracy"))
    assert [(x["budget"], x["r"]) for x in rows] == [(64, 0.1), (256, 0.1), (1024, 0.1)]
    assert [x["miss_r0"] for x in rows] == pytest.approx([0.7, 0.4, 0.9])
    assert [x["miss_r"] for x in rows] == pytest.approx([0.1, 0.0, 0.05])


def test_write_sweep_report_allocation(alloc_exp, tmp_path):
    """The markdown states the counts, holds the hand-computed rows and sentences and embeds PNGs that exist."""
    path = write_sweep_report(alloc_exp, out_dir=tmp_path / "out")
    assert path == tmp_path / "out" / "sweep_report.md"
    md = path.read_text()
    assert "17 trials: 15 finished, 1 errored, 0 stopped early by the scheduler, 1 running or unfinished" in md
    assert "| 64 | 0 | 0.120 [-0.13, 0.37] | 2 | 0.7 |" in md
    assert "| 1024 | 0.1 | 0.700 [0.65, 0.75] | 1 | 0.05 |" in md
    assert "| 64 | 1 | 0.420 [0.17, 0.67] | 0.1 | no (intervals overlap) |" in md
    assert "| 1024 | 0.1 | 0.700 [0.65, 0.75] | 1 | yes |" in md
    assert "- budget 64 at r=1 (0.420) matches budget 256 at r=0 (0.220)" in md
    assert "- budget 256 at r=0.1 (0.550) matches budget 1024 at r=1 (0.500)" in md
    assert "- budget 64: format_miss 0.700 at r=0 vs 0.100 at r=0.1" in md
    assert "| ab12c_00015 | 64 | 2 | 0.1 | 0.990 |  |  | sft | error |  |" in md
    assert "RuntimeError: CUDA out of memory" in md and "empty result.json" in md
    for name in ("sweep_ratio.png", "sweep_iso.png"):
        assert f"]({name})" in md
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
    assert write_sweep_report(alloc_exp) == alloc_exp / "sweep_report.md"  # default: into the experiment
    with pytest.raises(ValueError, match="mode"):
        write_sweep_report(alloc_exp, mode="best")


@pytest.fixture
def sams_exp(tmp_path):
    """A SamS search: dpo.keep_ratio x dpo.sams.encoder x seed, dpo.sams.lr fixed. Accuracy per seed:
    (0.25, mlp) 0.30 0.34; (0.25, tiny) 0.40 0.44; (0.5, mlp) 0.50 0.54; (0.5, tiny) 0.10 0.14."""
    exp = tmp_path / "sams"
    values = {(0.25, "mlp"): (0.30, 0.34), (0.25, "tiny"): (0.40, 0.44), (0.5, "mlp"): (0.50, 0.54),
              (0.5, "tiny"): (0.10, 0.14)}
    i = 0
    for (keep, encoder), accs in values.items():
        for seed, acc in enumerate(accs):
            params = {"dpo.keep_ratio": keep, "dpo.sams.encoder": encoder, "dpo.sams.lr": 1e-3, "seed": seed}
            write_trial(exp, i, params, [{"accuracy": acc, "stage": "dpo", "pref_accuracy": 0.6}])
            i += 1
    return exp


def test_generic_search_best_config_and_groups(sams_exp):
    """Best configuration: keep 0.5 with mlp, (0.50 + 0.54) / 2 = 0.52. By keep_ratio: 0.25 -> (0.30 + 0.34 +
    0.40 + 0.44) / 4 = 0.37, 0.5 -> (0.50 + 0.54 + 0.10 + 0.14) / 4 = 0.32. By encoder: mlp -> 0.42, tiny 0.27."""
    records = load_trials(sams_exp)
    assert searched_params(records) == ["dpo.keep_ratio", "dpo.sams.encoder"]
    params, c = best_config(records, "accuracy")
    assert params == {"dpo.keep_ratio": 0.5, "dpo.sams.encoder": "mlp", "dpo.sams.lr": 1e-3}
    assert c["mean"] == pytest.approx(0.52) and c["n"] == 2
    keep = group_by(records, "accuracy", lambda r: r["params"]["dpo.keep_ratio"])
    assert keep[0.25]["mean"] == pytest.approx(0.37) and keep[0.5]["mean"] == pytest.approx(0.32)
    enc = group_by(records, "accuracy", lambda r: r["params"]["dpo.sams.encoder"])
    assert enc["mlp"]["mean"] == pytest.approx(0.42) and enc["tiny"]["mean"] == pytest.approx(0.27)
    assert best_config(records, "accuracy", "min")[1]["mean"] == pytest.approx(0.12)
    assert math.isnan(group_by(records[:1], "accuracy", lambda r: 0)[0]["low"])  # one seed, no own interval


def test_write_sweep_report_generic(sams_exp):
    md = write_sweep_report(sams_exp).read_text()
    assert "8 trials: 8 finished, 0 errored, 0 stopped early by the scheduler, 0 running or unfinished" in md
    assert "Fixed: dpo.sams.lr=0.001" in md
    assert "`dpo.keep_ratio=0.5, dpo.sams.encoder=mlp, dpo.sams.lr=0.001`: accuracy 0.520 [" in md
    assert "| 0.25 | 0.370 [" in md and "| mlp | 0.420 [" in md
    assert "| ab12c_00000 | 0.25 | mlp | 0 | 0.300 |  | 0.600 | dpo | done |  |" in md
    for p in ("dpo.keep_ratio", "dpo.sams.encoder"):
        assert f"](sweep_param_{p}.png)" in md
        assert (sams_exp / f"sweep_param_{p}.png").read_bytes()[:8] == PNG_MAGIC


def test_a_trial_the_scheduler_stopped_is_listed_but_not_analysed(tmp_path):
    """ASHA stops a trial mid-stage: Tune calls it TERMINATED, but its last result is an interim one
    (final: False), so it must not enter the means beside trials that ran their final evaluation."""
    exp = tmp_path / "asha"
    write_trial(exp, 0, {"dpo.keep_ratio": 0.5}, [{"stage": "dpo-step", "pref_accuracy": 0.9, "final": False}])
    write_trial(exp, 1, {"dpo.keep_ratio": 0.25}, [{"stage": "dpo-step", "pref_accuracy": 0.5, "final": False},
                                                   {"stage": "dpo", "pref_accuracy": 0.6, "final": True}])
    records = sorted(load_trials(exp), key=lambda r: r["trial"])
    assert [r["status"] for r in records] == ["stopped early", "done"]
    assert [r["params"]["dpo.keep_ratio"] for r in finished(records, "pref_accuracy")] == [0.25]
    text = write_sweep_report(exp, metric="pref_accuracy").read_text()
    assert "2 trials: 1 finished, 0 errored, 1 stopped early by the scheduler" in text


def test_the_newest_experiment_state_is_chosen_by_name_not_mtime(alloc_exp):
    """A restored sweep writes a new experiment_state file but may also rewrite the older one last: the
    name (its start time) says which is current."""
    import os

    trial = by_params(load_trials(alloc_exp))[(64, 0.1, 2)]["trial"]
    old, new = (alloc_exp / f"experiment_state-2026-01-01_00-00-0{i}.json" for i in (0, 1))
    for path, status in ((new, "TERMINATED"), (old, "ERROR")):
        path.write_text(json.dumps({"trial_data": [[json.dumps({"relative_logdir": trial, "status": status}), "{}"]]}))
    os.utime(old, (2e9, 2e9))  # the older file touched last
    assert by_params(load_trials(alloc_exp))[(64, 0.1, 2)]["status"] == "done"
