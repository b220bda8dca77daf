"""MLflow tracking (runtime/tracking.py) against a real MLflow SQLite store in a temporary directory; the
stage and pipeline runs through Ray are tests/ray/test_tracking_ray.py."""

import logging
import math
from pathlib import Path

import pytest

from unipipe_ray.runtime import tracking

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.configure(uri, "tests")
    yield mlflow.MlflowClient(uri)
    tracking.configure(None)


def runs(client, experiment="tests"):
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_config_becomes_dotted_parameters_and_only_finite_numbers_become_metrics():
    params = tracking.flat_params({"model": "tiny", "train": {"lr": 1e-5, "lora": {"r": 8}}, "stages": ["sft"],
                                   "data": {}, "long": "x" * 7000})
    assert params["train.lr"] == "1e-05" and params["train.lora.r"] == "8" and params["stages"] == "['sft']"
    assert params["data"] == "{}" and len(params["long"]) == tracking.MAX_PARAM_CHARS
    assert tracking.metric_values({"step": 3, "sft/loss": 2, "sft/x": math.nan, "ok": True, "name": "a",
                                   "sft/lr": 1e-4}) == {"sft/loss": 2.0, "ok": 1.0, "sft/lr": 1e-4}


def test_off_by_default_every_call_is_a_no_op():
    tracking.configure(None)
    assert not tracking.enabled()
    with tracking.tracked_run("sft", {"a": 1}) as run_id:
        tracking.log_metrics(1, {"sft/loss": 1.0})
        tracking.log_artifacts("/nonexistent")
    assert run_id is None
    tracking.check()  # nothing to check


def test_a_pipeline_run_holds_its_stage_runs_with_params_metrics_artifacts_and_status(store, tmp_path):
    (tmp_path / "result.json").write_text("{}")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "reward.png").write_bytes(b"png")
    with tracking.tracked_run("demo", {"run_dir": "runs/demo"}) as parent:
        assert tracking.run_name("sft", "runs/demo/sft") == "demo/sft"
        with tracking.tracked_run(tracking.run_name("sft", "runs/demo/sft"), {"train": {"lr": 1e-3}}):
            for step, loss in [(1, 3.0), (2, 2.5), (3, 2.0)]:
                tracking.log_metrics(step, {"sft/loss": loss, "step": step})
            tracking.log_artifacts(tmp_path / "result.json", tmp_path / "missing.json")
        tracking.log_artifacts(tmp_path / "plots")
    got = runs(store)
    sft, demo = got["demo/sft"], got["demo"]
    assert sft.data.tags["mlflow.parentRunId"] == parent == demo.info.run_id
    assert sft.data.params == {"train.lr": "0.001"} and demo.data.params == {"run_dir": "runs/demo"}
    history = store.get_metric_history(sft.info.run_id, "sft/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert sft.info.status == demo.info.status == "FINISHED"
    assert [a.path for a in store.list_artifacts(sft.info.run_id)] == ["result.json"]
    assert [a.path for a in store.list_artifacts(demo.info.run_id, "plots")] == ["plots/reward.png"]
    # beside the store, not in ./mlruns of whatever directory the command ran in
    assert (tmp_path / "mlartifacts").is_dir() and not Path("mlruns").exists()


def test_a_stage_alone_is_named_after_its_output_dir_and_a_failure_ends_its_run_failed(store):
    assert tracking.run_name("dpo", "runs/dpo") == "dpo"
    assert tracking.run_name("dpo", "runs/exp3/") == "exp3/dpo"
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.tracked_run("exp3/dpo"):
            tracking.log_metrics(1, {"dpo/loss": 0.69})
            raise RuntimeError("boom")
    assert runs(store)["exp3/dpo"].info.status == "FAILED"


def test_a_tracker_failure_mid_run_is_said_once_and_training_goes_on(store, caplog, monkeypatch):
    with tracking.tracked_run("sft"):
        def broken(*a, **k):
            raise ConnectionError("tracking server went away")
        monkeypatch.setattr(tracking._client(), "log_batch", broken)
        with caplog.at_level(logging.WARNING, logger=tracking.__name__):
            tracking.log_metrics(1, {"sft/loss": 1.0})
            tracking.log_metrics(2, {"sft/loss": 0.9})
    said = [r.getMessage() for r in caplog.records if "logging metrics failed" in r.getMessage()]
    assert len(said) == 1 and "tracking server went away" in said[0]


def test_the_reporter_logs_its_lines_into_the_open_run(store, tmp_path):
    """PPO's controller reports from the driver's process: its Reporter's lines reach the open run."""
    from unipipe_ray.runtime.loop import Reporter

    with tracking.tracked_run("ppo"):
        reporter = Reporter("ppo", 2, None)
        reporter.line(1, {"ppo/kl": 0.01, "watch/hacking": False})
        reporter.line(2, {"ppo/kl": 0.02, "watch/hacking": True})
    run = runs(store)["ppo"]
    assert [(m.step, m.value) for m in store.get_metric_history(run.info.run_id, "ppo/kl")] == [(1, 0.01), (2, 0.02)]
    hacking = store.get_metric_history(run.info.run_id, "watch/hacking")
    assert [(m.step, m.value) for m in hacking] == [(1, 0.0), (2, 1.0)]  # the watch's verdict, as 0/1


def test_an_unusable_uri_stops_the_command_before_any_work(tmp_path, capsys):
    from unipipe_ray.cli import main

    (tmp_path / "notes.txt").write_text("a file where the store's directory would be")
    bad = f"sqlite:///{tmp_path}/notes.txt/mlflow.db"
    rc = main(["sft", "model=tiny", f"output_dir={tmp_path}/sft", "--mlflow", bad])
    err = capsys.readouterr().err
    assert rc == 2 and f"--mlflow {bad}: cannot use this tracking URI" in err
    assert not (tmp_path / "sft").exists()
    tracking.configure(None)


def test_the_progress_actor_keeps_lines_from_its_constructor_so_a_restarted_one_keeps_them_too():
    """Ray restarts an actor by running __init__ again with the same arguments: the keep flag is one."""
    from unipipe_ray.runtime.launch import _Progress

    kept, plain = _Progress(True), _Progress()
    for p in (kept, plain):
        p.update(1, 2, {"sft/loss": 1.0})
    assert kept.lines_from(0) == (1, [(1, {"sft/loss": 1.0})])
    assert plain.lines_from(0) == (0, [])
