"""The pipeline with an s3:// run_dir (moto's local S3 server): SFT -> DPO, DPO fails after its step-1
checkpoint; on a fresh machine (the staging copy deleted, another cache dir) the same command skips SFT and
resumes DPO from the checkpoint at the URI; a third machine finds both done. Ray Train writes the checkpoints
to the URI itself: none is ever in the driver's staging copy. Tiny model, built-in arith task."""

import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from ray.train import TrainingFailedError

from unipipe_ray.config import PipelineConfig, given_keys, load_config
from unipipe_ray.pipeline import rundir
from unipipe_ray.pipeline.run import run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

CONFIG = """
model: tiny
stages: [sft, dpo]
report: false
eval_size: 4
sft:
  data: &data
    task: arith
    task_size: 80
    eval_size: 4
    max_length: 96
  train: {batch_size: 4, max_steps: 2, lr: 2.0e-3, log_every: 1}
dpo:
  data: *data
  beta: 0.1
  train: {batch_size: 4, max_steps: 3, lr: 2.0e-3, log_every: 1, checkpoint_every: 1, max_failures: 0}
"""


@pytest.fixture
def s3():
    pytest.importorskip("moto")
    from tests.s3_local import s3_endpoint

    with s3_endpoint() as uri:
        yield uri


def remote_json(uri: str, rel: str) -> dict:
    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(f"{root}/{rel}") as f:
        return json.loads(f.read())


def remote_listing(uri: str) -> list[str]:
    fs, root = pafs.FileSystem.from_uri(uri)
    return [i.path[len(root) + 1:] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File]


def test_a_uri_run_continues_on_a_fresh_machine_from_what_reached_the_uri(ray_cluster, s3, tmp_path, monkeypatch,
                                                                          capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_text(CONFIG)
    uri = s3("runs/exp1")
    overrides = [f"run_dir={uri}"]
    cfg = load_config(PipelineConfig, path, overrides)
    given = given_keys(str(path), overrides)
    bare = uri.split("?")[0]

    monkeypatch.setattr(rundir, "cache_dir", lambda: tmp_path / "machine-a")
    with pytest.raises(TrainingFailedError):  # the killed DPO worker, with no restart left
        run_pipeline(cfg, given, inject={"dpo": {"inject_failure_at": 1}})
    stages = remote_json(uri, "manifest.json")["stages"]
    assert stages["sft"]["status"] == "done" and stages["dpo"]["status"] == "failed"
    assert stages["sft"]["checkpoint"].startswith(f"{bare}/sft/sft/checkpoint_")  # named by the URI
    assert stages["dpo"]["config"]["model"] == stages["sft"]["checkpoint"]
    assert any(p.startswith("dpo/dpo/checkpoint_") for p in remote_listing(uri))  # Ray Train wrote it there
    staging = tmp_path / "machine-a"
    assert list(staging.glob("**/sft_config.json")) and not list(staging.glob("**/checkpoint_*"))  # none on the driver

    shutil.rmtree(tmp_path / "machine-a")  # a fresh machine: no staging copy, and its own cache dir
    monkeypatch.setattr(rundir, "cache_dir", lambda: tmp_path / "machine-b")
    capsys.readouterr()
    out = run_pipeline(cfg, given)
    log = capsys.readouterr().out
    assert "sft: skip" in log and "dpo: resume" in log and "from its last checkpoint (step 1)" in log, log
    assert out["uri"] == bare and out["run_dir"].startswith(str(tmp_path / "machine-b"))
    assert out["checkpoints"]["dpo"].startswith(f"{bare}/dpo/dpo/checkpoint_")  # at the URI, where any node reads it
    assert not list(Path(out["run_dir"]).glob("**/checkpoint_*"))
    assert remote_json(uri, "dpo/result.json")["metrics"]["resumed_at_step"] == 1  # continued at the URI's checkpoint
    stages = remote_json(uri, "manifest.json")["stages"]
    assert stages["dpo"]["status"] == "done" and stages["dpo"]["checkpoint"].startswith(f"{bare}/dpo/dpo/")

    monkeypatch.setattr(rundir, "cache_dir", lambda: tmp_path / "machine-c")
    capsys.readouterr()
    run_pipeline(cfg, given)
    log = capsys.readouterr().out
    assert "sft: skip" in log and "dpo: skip" in log, log
