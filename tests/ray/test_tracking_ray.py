"""``unipipe run --mlflow``: a chained run (SFT -> PPO, with its report) in a local MLflow store, one run for the
chain and one per stage, with the stages' figures as they reported them (SFT from Ray Train workers through the
progress actor, PPO from its controller in the driver). Local Ray cluster, tiny model, built-in arith task."""

import json

import pytest

from unipipe_ray.cli import main
from unipipe_ray.runtime import tracking

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
mlflow = pytest.importorskip("mlflow")

CONFIG = """
model: tiny
stages: [sft, ppo]
eval_size: 4
eval_max_new_tokens: 8
sft:
  data: &data {task: arith, task_size: 40, eval_size: 4, max_length: 96}
  train: {batch_size: 4, max_steps: 3, lr: 2.0e-3, log_every: 1}
ppo:
  data: *data
  estimator: grpo
  engine: hf
  iterations: 2
  prompts_per_iter: 4
  samples_per_prompt: 2
  max_new_tokens: 8
  minibatch_size: 8
  train: {lr: 1.0e-3}
"""


def test_a_chained_run_is_one_mlflow_run_with_a_child_run_per_stage(ray_cluster, tmp_path):
    from tests.ray.test_stages_ray import tensorboard_scalars

    (tmp_path / "pipeline.yaml").write_text(CONFIG)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "demo"
    try:
        assert main(["run", "--config", str(tmp_path / "pipeline.yaml"), f"run_dir={run_dir}",
                     "--mlflow", uri, "--mlflow-experiment", "chain"]) == 0
    finally:
        tracking.configure(None)

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("chain")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"demo", "demo/sft", "demo/ppo"}
    chain, sft, ppo = runs["demo"], runs["demo/sft"], runs["demo/ppo"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert sft.data.tags["mlflow.parentRunId"] == ppo.data.tags["mlflow.parentRunId"] == chain.info.run_id
    assert chain.data.params["stages"] == "['sft', 'ppo']" and sft.data.params["train.max_steps"] == "3"
    assert ppo.data.params["model"] == json.loads((run_dir / "sft/result.json").read_text())["checkpoint"]

    # every line the SFT workers reported, at its step, with the values TensorBoard got
    logged = [(m.step, m.value) for m in client.get_metric_history(sft.info.run_id, "sft/loss")]
    assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in tensorboard_scalars(run_dir / "sft/tensorboard")
                      ["sft/loss"]]
    assert [s for s, _ in logged] == [1, 2, 3]
    history = json.loads((run_dir / "ppo/history.json").read_text())
    kl = [(m.step, m.value) for m in client.get_metric_history(ppo.info.run_id, "ppo/kl")]
    assert kl == [(h["iteration"], pytest.approx(h["ppo/kl"])) for h in history]
    assert "watch/hacking" in ppo.data.metrics and "ppo/gold_mean" in ppo.data.metrics

    def files(run, path=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}
    assert files(sft) == {"sft_config.json", "result.json"}
    assert files(ppo) == {"ppo_config.json", "result.json", "history.json"}
    assert {"report.md", "report.json", "manifest.json", "plots"} <= files(chain)
    assert files(chain, "plots")  # the report's figures
