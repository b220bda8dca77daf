"""PPO with its checkpoints in S3 (moto's local server) and no shared filesystem assumed: two policy
trainers upload their parts of each checkpoint themselves; a save stopped after every part is uploaded but
before its commit leaves the previous checkpoint in force; a fresh machine (another directory for the
driver's files, another cache) resumes from that one and repeats the stopped run's iterations."""

import pytest

from unipipe_ray.config import PPOConfig, load_config
from unipipe_ray.core import models, storage
from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.ppo import state as ppo_state
from unipipe_ray.ppo.controller import run_ppo

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


@pytest.fixture
def s3():
    pytest.importorskip("moto")
    from tests.s3_local import s3_endpoint

    with s3_endpoint() as uri:
        yield uri


def test_ppo_in_s3_resumes_on_a_fresh_machine_from_the_last_committed_checkpoint(ray_cluster, s3, tmp_path,
                                                                                  monkeypatch):
    import json

    uri = s3("run/ppo")
    overrides = ["data.task_size=100", "data.eval_size=4", "max_new_tokens=8", "prompts_per_iter=8",
                 "samples_per_prompt=4", "minibatch_size=16", "estimator=grpo", "ppo_epochs=2", "train.lr=3e-2",
                 "kl_coef=0", "rule_reward=tests.ray.rules:low_id_share", "iterations=4",
                 "train.checkpoint_every=1", "train.num_workers=2",
                 f"model={tiny_model_dir(tie_word_embeddings=False)}"]
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "machine-a" / "cache")
    first = load_config(PPOConfig, overrides=overrides + [f"output_dir={tmp_path / 'machine-a' / 'ppo'}"])
    with pytest.raises(RuntimeError, match="before committing checkpoint 3"):
        run_ppo(first, storage=uri, inject_commit_failure_at=3)
    stopped = json.loads((tmp_path / "machine-a" / "ppo" / "history.json").read_text())
    checkpoints = storage.join(uri, "checkpoint")
    assert len(stopped) == 3
    assert ppo_state.find(checkpoints) == storage.join(checkpoints, "iteration-000002")  # 3 was not committed
    assert "iteration-000003" in storage.children(checkpoints)  # complete, but never named by the pointer

    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "machine-b" / "cache")
    fresh = load_config(PPOConfig, overrides=overrides + [f"output_dir={tmp_path / 'machine-b' / 'ppo'}"])
    result = run_ppo(fresh, storage=uri)
    rows = json.loads((tmp_path / "machine-b" / "ppo" / "history.json").read_text())
    assert result["resumed_at_iteration"] == 2
    assert [h["iteration"] for h in rows] == [1, 2, 3, 4]
    # iteration 3 again, from checkpoint 2's weights and optimizer state (two ranks' shards, from the bucket)
    for key in ("ppo/rule_mean", "ppo/policy_loss", "ppo/approx_kl", "ppo/grad_norm"):
        assert rows[2][key] == pytest.approx(stopped[2][key], rel=1e-5, abs=1e-7), key
    assert storage.children(checkpoints) == ["iteration-000003", "latest.json"]  # rewritten and committed
    assert result["checkpoint"] == storage.join(uri, "final-000004")
    assert (models.Path(models.resolve_model(result["checkpoint"])) / "config.json").is_file()
    assert not list(tmp_path.glob("machine-*/ppo/**/controller.json"))  # nothing of it on a driver's disk


def test_a_stage_command_with_an_s3_output_dir_keeps_everything_in_the_bucket(ray_cluster, s3, tmp_path, monkeypatch,
                                                                               capsys):
    """`unipipe sft output_dir=s3://...`: Ray Train writes the checkpoints to the bucket, the driver's files
    (config, result, tensorboard) are uploaded at the end, and the checkpoint loads from its URI."""
    import json

    from unipipe_ray.cli import main
    from unipipe_ray.pipeline import rundir

    monkeypatch.setattr(rundir, "cache_dir", lambda: tmp_path / "cache")
    uri = s3("standalone/sft")
    assert main(["sft", "model=tiny", f"output_dir={uri}", "data.task_size=40", "data.eval_size=4",
                 "data.max_length=64", "train.batch_size=4", "train.max_steps=2"]) == 0
    assert f"result record: {storage.join(uri, 'result.json')}" in capsys.readouterr().out
    files = [rel for rel, _, _ in storage.listing(uri)]
    assert {"sft_config.json", "result.json"} <= set(files) and any(f.startswith("tensorboard/") for f in files)
    result = json.loads(storage.read_text(storage.join(uri, "result.json")))
    assert result["checkpoint"].startswith(uri.split("?")[0] + "/sft/checkpoint_")
    assert (models.Path(models.resolve_model(result["checkpoint"])) / "model.safetensors").is_file()
    assert not list((tmp_path / "cache").glob("**/checkpoint_*"))  # none on the driver's disk


def test_a_tune_sweep_in_s3_keeps_its_trials_and_report_there_and_restores_from_there(ray_cluster, s3, tmp_path,
                                                                                      monkeypatch):
    """storage_path=s3://...: Tune keeps its experiment in the bucket (RunConfig storage_filesystem), each
    trial's stage run is a pipeline with a run_dir in the bucket, the report is written from a local copy of
    the small files and uploaded; the same command again restores the finished sweep from the bucket."""
    from unipipe_ray.pipeline import rundir
    from unipipe_ray.tune.config import TuneConfig
    from unipipe_ray.tune.run import run_tune

    monkeypatch.setattr(rundir, "cache_dir", lambda: tmp_path / "cache")
    path = tmp_path / "sweep.yaml"
    path.write_text("""
name: grid
base:
  model: tiny
  stages: [sft]
  eval_size: 4
  eval_max_new_tokens: 8
  sft:
    data: {task: arith, task_size: 40, eval_size: 4, max_length: 64}
    train: {batch_size: 4, max_steps: 2, lr: 2.0e-3, log_every: 1}
space:
  sft.train.lr: {grid: [1.0e-3, 2.0e-3]}
max_concurrent_trials: 2
""")
    cfg = load_config(TuneConfig, path, [f"storage_path={s3('tune')}"])
    exp = run_tune(cfg, given=set())
    assert exp == storage.join(s3("tune"), "grid")
    files = [rel for rel, _, _ in storage.listing(exp)]
    trials = [f for f in files if f.endswith("/params.json") and not f.startswith("stages/")]
    assert len(trials) == 2 and "unipipe_tune.json" in files and "sweep_report.md" in files
    checkpoints = {f.split("/")[1] for f in files if f.startswith("stages/") and "/sft/sft/checkpoint_" in f}
    assert len(checkpoints) == 2  # each trial's SFT checkpoint, in the bucket
    assert "2 finished" in storage.read_text(storage.join(exp, "sweep_report.md"))
    results = {f: storage.read_text(storage.join(exp, f)) for f in files if f.endswith("/result.json")
               and not f.startswith("stages/")}
    assert not list(tmp_path.glob("cache/**/checkpoint_*"))

    again = run_tune(cfg, given=set())  # restored from the bucket: the finished trials do not run again
    assert again == exp
    assert {f: storage.read_text(storage.join(exp, f)) for f in results} == results
