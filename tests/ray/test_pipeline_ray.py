"""The chained pipeline on a tiny model: SFT -> RM -> PPO -> DPO with a manifest and a report; stopped in PPO
it resumes there; a changed DPO setting re-runs only DPO. Local Ray cluster, built-in arith task."""

import json

import pytest

from unipipe_ray.cli import main
from unipipe_ray.config import PipelineConfig, given_keys, load_config
from unipipe_ray.pipeline.run import run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

DATA = """  data: &data
    task: arith
    task_size: 80
    eval_size: 4
    max_length: 96
"""
CONFIG = f"""
model: tiny
eval_size: 4
eval_max_new_tokens: 12
sft:
{DATA}  train: {{batch_size: 4, max_steps: 3, lr: 2.0e-3, log_every: 1}}
rm:
  data: *data
  train: {{batch_size: 4, max_steps: 3, lr: 2.0e-3, log_every: 1}}
ppo:
  data: *data
  estimator: grpo
  iterations: 3
  prompts_per_iter: 4
  samples_per_prompt: 2
  max_new_tokens: 8
  minibatch_size: 8
  train: {{lr: 1.0e-3, checkpoint_every: 1}}
dpo:
  data: *data
  beta: 0.1
  train: {{batch_size: 4, max_steps: 3, lr: 2.0e-3, log_every: 1}}
"""


def manifest(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def test_chain_stops_in_ppo_resumes_there_and_reruns_only_a_changed_dpo(ray_cluster, tmp_path, capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_text(CONFIG)
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}"]
    cfg = load_config(PipelineConfig, path, overrides)

    with pytest.raises(RuntimeError, match="injected stop"):
        run_pipeline(cfg, given_keys(str(path), overrides), inject={"ppo": {"inject_stop_at": 2}})
    stages = manifest(run_dir)
    assert [stages[s]["status"] for s in ("sft", "rm", "ppo")] == ["done", "done", "failed"]
    assert "dpo" not in stages
    # chained inputs: the RM starts from the SFT model, PPO from the SFT policy with the RM as reward model
    assert stages["rm"]["config"]["model"] == stages["sft"]["checkpoint"]
    assert stages["ppo"]["config"]["model"] == stages["sft"]["checkpoint"]
    assert stages["ppo"]["config"]["reward_model"] == stages["rm"]["checkpoint"]

    capsys.readouterr()
    out = run_pipeline(cfg, given_keys(str(path), overrides))
    log = capsys.readouterr().out
    assert "sft: skip" in log and "rm: skip" in log and "ppo: resume" in log and "dpo: run" in log
    assert "resuming from its last checkpoint (iteration 2)" in log
    stages = manifest(run_dir)
    assert all(stages[s]["status"] == "done" for s in ("sft", "rm", "ppo", "dpo"))
    ppo_result = json.loads((run_dir / "ppo" / "result.json").read_text())
    assert ppo_result["resumed_at_iteration"] == 2
    assert [h["iteration"] for h in json.loads((run_dir / "ppo" / "history.json").read_text())] == [1, 2, 3]
    assert stages["dpo"]["config"]["model"] == stages["ppo"]["checkpoint"]  # DPO starts from the PPO policy
    report = (run_dir / "report.md").read_text()
    for row in ("exact_match", "rm_score", "implicit_accuracy", "kl_to_sft"):
        assert f"| {row} |" in report, row
    assert "Reward model: held-out preference accuracy" in report
    assert "| rm_accuracy |" not in report  # the RM's figure, stated once, not in a policy's column
    assert json.loads((run_dir / "report.json").read_text())["rm"]["rm_accuracy"]["n"] > 0
    assert "weights in float32" in report  # the answers' dtype (eval_dtype's default)
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"sft.png", "rm.png", "ppo.png", "dpo.png"}
    figures = json.loads((run_dir / "report.json").read_text())["results"]
    assert set(figures) == {"base", "sft", "ppo", "dpo"}
    assert 0 <= figures["dpo"]["implicit_accuracy"]["estimate"] <= 1
    assert out["report"].endswith("report.md")

    finished = {s: stages[s]["finished"] for s in stages}
    capsys.readouterr()
    assert main(["run", "--config", str(path), *overrides, "dpo.beta=0.2", "report=false"]) == 0
    log = capsys.readouterr().out
    assert "sft: skip" in log and "rm: skip" in log and "ppo: skip" in log
    assert "dpo: run - config changed (beta)" in log
    stages = manifest(run_dir)
    assert all(stages[s]["finished"] == finished[s] for s in ("sft", "rm", "ppo"))
    assert stages["dpo"]["finished"] != finished["dpo"] and stages["dpo"]["config"]["beta"] == 0.2
    assert len(list((run_dir / "replaced").iterdir())) == 1  # the earlier DPO outputs were kept aside
