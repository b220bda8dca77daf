"""Ray Tune sweeps on the tiny model, local Ray cluster, built-in arith task: one trial's budget split and
its reports; a 2 x 2 grid (budget x SFT ratio) whose trial failing before DPO is retried by running the same
sweep again - the finished trials are not run again and the failed one skips its finished SFT - and the
sweep report from the finished experiment directory."""

import json

import pytest

from unipipe_ray.cli import main
from unipipe_ray.config import load_config
from unipipe_ray.pipeline.manifest import Manifest
from unipipe_ray.tune.config import TuneConfig
from unipipe_ray.tune.run import run_tune
from unipipe_ray.tune.trainable import run_trial, trial_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

SWEEP = """
name: grid
base:
  model: tiny
  eval_size: 4
  eval_max_new_tokens: 12
  sft:
    data: &data {task: arith, task_size: 80, eval_size: 4, max_length: 96}
    train: {batch_size: 4, epochs: 1, lr: 2.0e-3, log_every: 1}
  dpo:
    data: *data
    beta: 0.5
    train: {batch_size: 4, epochs: 1, lr: 2.0e-3, log_every: 1}
space:
  budget: {grid: [8, 16]}
  sft_ratio: {grid: [1.0, 0.5]}
  seed: 0
max_concurrent_trials: 2
"""


def sweep_config(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return load_config(TuneConfig, path, [f"storage_path={tmp_path / 'tune'}"])


def test_a_trial_splits_its_budget_and_reports_after_each_stage(ray_cluster, tmp_path):
    from unipipe_ray.tune.run import base_tree

    cfg = sweep_config(tmp_path)
    trial = trial_config(base_tree(cfg), {"budget": 16, "sft_ratio": 0.25, "seed": 1}, str(tmp_path / "trial"))
    reports = list(run_trial(trial, given=set()))

    assert [r["stage"] for r in reports] == ["sft", "dpo"]
    assert (reports[0]["sft_examples"], reports[0]["pref_pairs"]) == (4, 12)
    for r in reports:
        assert 0.0 <= r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] <= 1.0
        assert r["n_eval"] == 4 and 0 <= r["format_miss_count"] <= 4
    assert 0.0 <= reports[1]["pref_accuracy"] <= 1.0
    stages = Manifest(tmp_path / "trial").data["stages"]
    sft_result = json.loads((tmp_path / "trial/sft/result.json").read_text())
    dpo_result = json.loads((tmp_path / "trial/dpo/result.json").read_text())
    assert (sft_result["train_examples"], dpo_result["train_examples"]) == (4, 12)
    # DPO starts from the SFT model, which is also its reference (ref_model unset: the input model)
    assert stages["dpo"]["config"]["model"] == stages["sft"]["checkpoint"]
    assert stages["dpo"]["config"]["ref_model"] is None


@pytest.fixture(scope="module")
def finished_sweep(ray_cluster, tmp_path_factory):
    """The 2 x 2 grid run twice: the first run fails (budget 16, r 0.5) before its DPO stage. Both runs are
    tracked in MLflow (``--mlflow``), as a user who passes it every time would have them."""
    from unipipe_ray.runtime import tracking

    tmp_path = tmp_path_factory.mktemp("sweep")
    cfg = sweep_config(tmp_path)
    tracking.configure(f"sqlite:///{tmp_path}/mlflow.db", "sweeps")
    try:
        exp_dir = run_tune(cfg, given=set(), inject={"params": {"budget": 16, "sft_ratio": 0.5}, "before": "dpo"})
        first = {p.parent.name: p.read_text() for p in exp_dir.glob("*/result.json")}
        [failed_run] = (exp_dir / "stages").glob("budget=16_seed=0_sft_ratio=0.5_*")  # <params>_<trial id>
        sft_started = Manifest(failed_run).stage("sft")["started"]
        assert Manifest(failed_run).stage("dpo") is None
        run_tune(cfg, given=set())
    finally:
        tracking.configure(None)
    return exp_dir, first, failed_run, sft_started


def test_the_grid_finishes_and_a_resumed_sweep_runs_only_the_failed_trial(finished_sweep):
    exp_dir, first, failed_run, sft_started = finished_sweep
    trials = {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
              for p in exp_dir.glob("*/result.json")}
    assert len(trials) == 4
    finals = {(t[-1]["config"]["budget"], t[-1]["config"]["sft_ratio"]): t[-1] for t in trials.values()}
    assert set(finals) == {(8, 1.0), (8, 0.5), (16, 1.0), (16, 0.5)}
    assert all(f["stage"] == ("sft" if r == 1.0 else "dpo") for (_, r), f in finals.items())
    # the finished trials' results are byte for byte what the first run wrote: they did not run again
    done_first = {name: text for name, text in first.items() if '"stage": "dpo"' in text or '"sft_ratio": 1.0' in text}
    assert len(done_first) == 3
    for name, text in done_first.items():
        assert (exp_dir / name / "result.json").read_text() == text
    # the failed trial ran again, skipped its finished SFT stage and ran DPO
    assert Manifest(failed_run).stage("sft")["started"] == sft_started
    assert Manifest(failed_run).stage("dpo")["status"] == "done"


def test_the_sweep_and_its_trials_are_runs_in_mlflow(finished_sweep):
    mlflow = pytest.importorskip("mlflow")
    exp_dir = finished_sweep[0]
    client = mlflow.MlflowClient(f"sqlite:///{exp_dir.parent.parent}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    launches = sorted((r for r in runs if r.info.run_name == "grid"), key=lambda r: r.info.start_time)
    trials = [r for r in runs if r.info.run_name != "grid"]
    assert len(launches) == 2 and all(r.info.status == "FINISHED" for r in launches)  # the first, the resume
    for launch in launches:  # the sweep config as parameters, the report as artifacts
        assert launch.data.params["base.dpo.beta"] == "0.5" and launch.data.params["name"] == "grid"
        assert {"sweep_report.md", "sweep_ratio.png"} <= {a.path for a in client.list_artifacts(launch.info.run_id)}
    # Tune's MLflow logger: a child run per trial of the first launch, and one more for the retried trial
    # (a resumed sweep keeps the logger it was started with, so it lands under the first launch's run too)
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {launches[0].info.run_id}
    by_split = {}
    for r in trials:
        by_split.setdefault((r.data.params["budget"], r.data.params["sft_ratio"]), []).append(r.info.status)
    assert sorted(by_split.pop(("16", "0.5"))) == ["FAILED", "FINISHED"]
    assert by_split == {k: ["FINISHED"] for k in [("8", "1.0"), ("8", "0.5"), ("16", "1.0")]}
    assert all("accuracy" in r.data.metrics for r in trials if r.info.status == "FINISHED")


def test_the_sweep_report_is_written_from_the_finished_directory(finished_sweep, tmp_path):
    exp_dir = finished_sweep[0]
    (exp_dir / "sweep_report.md").unlink()
    assert main(["sweep-report", str(exp_dir)]) == 0
    text = (exp_dir / "sweep_report.md").read_text()
    # the allocation sweep's sections, each required (a report of either kind alone must not pass)
    assert "by split (mean over seeds" in text and "## Best split per budget" in text and "## Trials" in text
    pngs = list(exp_dir.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert main(["sweep-report", str(tmp_path / "missing")]) == 2


SAMS_SEARCH = """
name: asha
base:
  model: tiny
  stages: [dpo]
  eval_size: 4
  eval_max_new_tokens: 8
  sft: {data: &data {task: arith, task_size: 80, eval_size: 4, max_length: 96}}
  dpo:
    data: *data
    scheduler: sams
    sams: {encoder: learned, depth: 2, width: 32, connector_width: 64, context_size: 32, encoder_heads: 2,
           encoder_ff_width: 64}
    train: {batch_size: 8, max_steps: 4, lr: 1.0e-3, eval_every: 2, log_every: 2}
space:
  dpo.keep_ratio: {choice: [0.25, 0.75]}
  dpo.sams.explore_weight: {loguniform: [0.001, 0.1]}
search: random
num_samples: 2
scheduler: asha
asha: {max_t: 2, grace_period: 1, reduction_factor: 2}
metric: pref_accuracy
max_concurrent_trials: 2
"""


def test_a_random_sams_search_under_asha_reports_mid_stage_and_finishes(ray_cluster, tmp_path):
    path = tmp_path / "sams.yaml"
    path.write_text(SAMS_SEARCH)
    exp_dir = run_tune(load_config(TuneConfig, path, [f"storage_path={tmp_path}", "report=false"]), given=set())
    trials = [[json.loads(line) for line in p.read_text().splitlines()] for p in exp_dir.glob("*/result.json")]
    assert len(trials) == 2
    for results in trials:
        # the DPO stage's periodic held-out evaluations reach Tune while the stage runs
        assert results[0]["stage"] == "dpo-step" and all(0.0 <= r["pref_accuracy"] <= 1.0 for r in results)
        config = results[-1]["config"]
        assert config["dpo.keep_ratio"] in (0.25, 0.75) and 0.001 <= config["dpo.sams.explore_weight"] <= 0.1
    # ASHA may stop the weaker trial at a rung (its last result is mid-stage); the first trial to reach the top
    # rung (max_t = 2) is never stopped and runs past it to the end of its stage and the final evaluation
    finished = [r for r in trials if r[-1]["stage"] == "dpo"]
    assert finished and all(r[-1]["training_iteration"] > 2 for r in finished)
    assert all(r[-1]["training_iteration"] <= 2 for r in trials if r[-1]["stage"] == "dpo-step")
