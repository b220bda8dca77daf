"""A URI run_dir: the staging copy of the driver's files pushed to and pulled from the URI through pyarrow.fs,
beside the checkpoints the stages write there themselves, on a file:// URI (the real LocalFileSystem) and on
s3:// (moto's local S3 server). "Another machine" is another cache dir, so its staging copy has another path
and the paths in the run's JSON files must follow, while checkpoints stay named by their URI."""

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from unipipe_ray.config import PipelineConfig, load_config
from unipipe_ray.core import storage
from unipipe_ray.pipeline import rundir
from unipipe_ray.pipeline.manifest import Manifest
from unipipe_ray.pipeline.run import run_pipeline
from unipipe_ray.pipeline.rundir import RunDir


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto")
    from tests.s3_local import s3_endpoint

    with s3_endpoint() as uri:
        yield uri


@pytest.fixture(params=["file", "s3"])
def uri(request, tmp_path):
    """The run_dir URI of this test (a fresh directory or prefix)."""
    if request.param == "file":
        return f"file://{tmp_path}/remote/run"
    return request.getfixturevalue("s3")(f"{tmp_path.name}/run")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """machine(name): from now on the staging copies live in that machine's cache dir."""
    def switch(name: str):
        monkeypatch.setattr(rundir, "cache_dir", lambda: tmp_path / name)
    switch("machine-a")
    return switch


def remote_files(uri: str) -> dict[str, bytes]:
    """{path relative to the run_dir: content} of every file at the URI."""
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path[len(root) + 1:]] = f.read()
    return out


def finished_sft(run: RunDir, checkpoint: str = "checkpoint_1") -> Manifest:
    """A done sft stage as the stage leaves it: its checkpoint written to the URI (by Ray Train, from a
    worker's node), its config file and tensorboard events in the staging copy, its manifest entry."""
    stage = run.local / "sft"
    (stage / "tensorboard").mkdir(parents=True, exist_ok=True)
    (stage / "tensorboard" / "events.out").write_bytes(b"events")
    (stage / "sft_config.json").write_text(json.dumps({"output_dir": str(stage), "model": "tiny"}))
    where = storage.join(run.storage("sft"), "sft", checkpoint)
    fs, path = storage.open_uri(where)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/model.safetensors") as f:
        f.write(b"\x00weights" * 100)
    manifest = Manifest(run.local)
    if manifest.stage("sft") is None:  # else the attempt that started earlier ends now
        manifest.start("sft", {"output_dir": str(stage)})
    manifest.finish("sft", {"checkpoint": where, "seconds": 1.0})
    return manifest


def test_push_names_the_staging_copy_by_uri_and_another_machine_pulls_it_to_its_own_paths(uri, machine):
    a = RunDir(uri)
    assert a.uri == uri.split("?")[0] and a.local.is_relative_to(Path(rundir.cache_dir()))
    assert a.storage("sft") == storage.join(uri, "sft")  # the query (an S3 endpoint) stays at the end
    finished_sft(a)
    (a.local / "report.md").write_text(f"Run directory `{a.local}`\n")
    a.push("sft", "manifest.json", "report.md")
    files = remote_files(uri)
    assert set(files) == {"manifest.json", "report.md", "sft/sft_config.json", "sft/tensorboard/events.out",
                          "sft/sft/checkpoint_1/model.safetensors"}
    assert files["report.md"].decode() == f"Run directory `{a.uri}`\n"
    entry = json.loads(files["manifest.json"])["stages"]["sft"]
    checkpoint = storage.join(uri, "sft/sft/checkpoint_1")
    assert entry["checkpoint"] == checkpoint and entry["config"]["output_dir"] == f"{a.uri}/sft"
    assert json.loads(files["sft/sft_config.json"])["output_dir"] == f"{a.uri}/sft"

    machine("machine-b")
    b = RunDir(uri)
    assert b.local != a.local
    b.pull(("sft", "dpo"))
    entry = Manifest(b.local).stage("sft")
    assert entry["checkpoint"] == checkpoint  # a checkpoint stays at the URI: the next stage reads it there
    assert entry["config"]["output_dir"] == str(b.local / "sft")
    assert json.loads((b.local / "sft" / "sft_config.json").read_text())["output_dir"] == str(b.local / "sft")
    assert (b.local / "sft/tensorboard/events.out").read_bytes() == b"events"
    assert not (b.local / "sft" / "sft").exists()  # the stage's checkpoints are not copied to the driver
    assert not (b.local / "dpo").exists()


def test_push_mirrors_the_drivers_files_and_leaves_the_stages_checkpoints_alone(uri, machine):
    run = RunDir(uri)
    finished_sft(run)
    run.push("sft", "manifest.json")
    (run.local / "sft" / "tensorboard" / "events.out").unlink()  # the driver's own files: the URI follows
    finished_sft(run, "checkpoint_2")
    (run.local / "sft" / "tensorboard" / "events.out").unlink()
    run.push("sft")
    assert set(remote_files(uri)) == {"manifest.json", "sft/sft_config.json",
                                      "sft/sft/checkpoint_1/model.safetensors",
                                      "sft/sft/checkpoint_2/model.safetensors"}

    moved = run.set_aside("sft")
    assert moved.parent == run.local / "replaced" and not (run.local / "sft").exists()
    files = remote_files(uri)
    assert not any(p.startswith("sft/") for p in files)
    assert f"replaced/{moved.name}/sft/checkpoint_2/model.safetensors" in files
    assert f"replaced/{moved.name}/sft_config.json" in files
    finished_sft(run, "checkpoint_3")  # the stage runs again, into directories the move deleted at the URI
    run.push("sft")
    assert {"sft/sft/checkpoint_3/model.safetensors", "sft/sft_config.json"} <= set(remote_files(uri))


def test_pull_keeps_a_staging_copy_further_along_and_sets_aside_an_older_attempt(uri, machine):
    a = RunDir(uri)
    Manifest(a.local).start("sft", {"output_dir": str(a.local / "sft")})
    a.push("manifest.json")
    finished_sft(a)  # done here, but its push never happened (a network error, say)
    entry = Manifest(a.local).stage("sft")
    a.pull(("sft",))  # the same attempt, further along: kept, and the URI catches up
    assert Manifest(a.local).stage("sft") == entry
    assert json.loads(remote_files(uri)["manifest.json"])["stages"]["sft"]["status"] == "done"
    assert "sft/sft_config.json" in remote_files(uri)

    machine("machine-b")  # another machine runs sft again (a new attempt) and pushes it
    b = RunDir(uri)
    b.pull(("sft",))
    b.set_aside("sft")
    finished_sft(b, "checkpoint_9")
    newer = Manifest(b.local)
    newer.data["stages"]["sft"]["started"] = "2999-01-01T00:00:00+00:00"
    newer.save()
    b.push("sft", "manifest.json")

    machine("machine-a")  # back on the first machine: the URI's attempt wins, the old copy is kept aside
    a = RunDir(uri)
    a.pull(("sft",))
    entry = Manifest(a.local).stage("sft")
    assert entry["started"].startswith("2999") and entry["checkpoint"].split("?")[0].endswith("/checkpoint_9")
    stale = [p.name for p in (a.local / "replaced").iterdir()]
    assert len(stale) == 1 and stale[0].startswith("sft-") and stale[0].endswith("-stale")


def test_a_local_run_dir_needs_no_sync(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    assert run.uri is None and run.local == tmp_path / "run"
    run.pull(("sft",))
    run.push("manifest.json")
    assert not (tmp_path / "run").exists() and run.shown(tmp_path / "x") == str(tmp_path / "x")


@pytest.mark.parametrize("bad", ["nosuch://bucket/run", "file://relative/run", "file:///proc/unipipe/run"])
def test_an_unusable_run_dir_stops_the_pipeline_before_anything_runs(bad, tmp_path):
    cfg = load_config(PipelineConfig, overrides=[f"run_dir={bad}", "model=tiny"])
    with pytest.raises(ValueError, match=f"run_dir '{bad}' is not usable"):
        run_pipeline(cfg, set())


def test_a_missing_bucket_is_named(s3):
    with pytest.raises(ValueError, match="run_dir 's3://no-such-bucket/run.*is not usable.*no-such-bucket' not found"):
        RunDir(s3("run", bucket="no-such-bucket"))
