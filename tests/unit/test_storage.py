"""Checkpoints in cluster storage (core/storage.py) and PPO's commit protocol there (ppo/state.py), on a
file:// URI (pyarrow's real LocalFileSystem) and on s3:// (moto's local S3 server). "Another node" is another
cache dir. The PPO trainers are stood in for by a group whose save writes files the way a trainer does
(through storage.writing_to); the Ray test of the same protocol is in tests/ray/test_storage_ray.py."""

import json
from pathlib import Path

import pytest

from unipipe_ray.core import models, storage
from unipipe_ray.ppo import state as ppo_state


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto")
    from tests.s3_local import s3_endpoint

    with s3_endpoint() as uri:
        yield uri


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/remote"
    return request.getfixturevalue("s3")(f"{tmp_path.name}/remote")


@pytest.fixture
def node(tmp_path, monkeypatch):
    """node(name): from now on downloads land in that node's cache dir."""
    def switch(name: str):
        monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / name)
    switch("node-a")
    return switch


def test_join_keeps_the_query_last_and_relative_inverts_it():
    uri = "s3://bucket/run?endpoint_override=localhost:9000&scheme=http"
    assert storage.split(uri) == ("s3://bucket/run", "endpoint_override=localhost:9000&scheme=http")
    assert storage.join(uri, "sft", "/sft/") == "s3://bucket/run/sft/sft?endpoint_override=localhost:9000&scheme=http"
    assert storage.join("gs://b/run/", "x") == "gs://b/run/x"
    assert storage.relative(storage.join(uri, "sft/checkpoint_1"), uri) == "sft/checkpoint_1"
    assert storage.relative(uri, uri) == ""
    assert storage.relative("s3://bucket/other/x", "s3://bucket/run") is None
    assert storage.relative("s3://bucket/run/x", uri) is None  # another endpoint is another store
    assert storage.is_uri(uri) and not storage.is_uri("/runs/sft") and not storage.is_uri(None)


def test_localize_downloads_once_per_node_and_again_when_the_files_change(root, node, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x01" * 1000)
    where = storage.join(root, "sft/final")
    with storage.writing_to(where) as local:
        for f in src.rglob("*"):
            if f.is_file():
                (Path(local) / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (Path(local) / f.relative_to(src)).write_bytes(f.read_bytes())
    assert [rel for rel, _, _ in storage.listing(where)] == ["config.json", "sub/weights.bin"]

    first = Path(storage.localize(where))
    assert first.is_relative_to(tmp_path / "node-a")
    assert (first / "sub" / "weights.bin").read_bytes() == b"\x01" * 1000
    assert storage.localize(where) == str(first)  # cached: no second download
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".download-")]
    assert models.resolve_model(where) == str(first)  # a URI is a model spec like a path

    storage.write_text(storage.join(where, "config.json"), '{"changed": true}')  # written again
    second = Path(storage.localize(where))
    assert second != first and json.loads((second / "config.json").read_text()) == {"changed": True}

    node("node-b")
    assert Path(storage.localize(where)).is_relative_to(tmp_path / "node-b")
    assert storage.localize(str(src)) == str(src)  # a local path is left as it is


def test_models_cross_to_other_nodes_as_uris_or_names_never_as_the_drivers_cache_paths(root, node, tmp_path):
    """The driver's cache path of a converted or generated model does not exist on another node: a built-in
    name and a URI are handed to workers as themselves and made locally on each node."""
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    where = storage.join(root, "models/m")
    storage.upload_dir(str(src), where)
    assert models.shareable_model(where) == where and models.shareable_model(models.TINY_MODEL) == "tiny"
    assert models.shareable_model(str(src)) == str(src)  # a local directory must be on every node
    node("node-b")
    assert Path(models.node_model(where)).is_relative_to(tmp_path / "node-b")
    assert Path(models.node_model("tiny")).is_relative_to(tmp_path / "node-b")  # generated here, not read there
    assert models.node_model(str(src)) == str(src) and models.node_model("org/name") == "org/name"


def test_a_missing_uri_is_named(root, node):
    with pytest.raises(FileNotFoundError, match="nothing is stored under that URI"):
        storage.localize(storage.join(root, "no/such/checkpoint"))


class _Trainers:
    """Stands in for PPO's policy/critic actor group: ``save_checkpoint`` writes weights and optimizer files
    through storage.writing_to, as the trainer actor does; ``fail_after`` files it stops (a kill mid-upload)."""

    def __init__(self, weights: bytes, fail_after: int | None = None):
        self.weights, self.fail_after = weights, fail_after

    def call(self, method: str, directory: str, tokenizer_dir: str) -> None:
        assert method == "save_checkpoint"
        if self.fail_after is not None:  # a partial upload: some files reach the store, then the process dies
            fs, path = storage.open_uri(directory)
            fs.create_dir(path, recursive=True)
            for i in range(self.fail_after):
                with fs.open_output_stream(f"{path}/part{i}") as f:
                    f.write(b"partial")
            raise RuntimeError("killed mid-upload")
        with storage.writing_to(directory) as local:
            (Path(local) / "engine").mkdir()
            (Path(local) / "model.safetensors").write_bytes(self.weights)
            (Path(local) / "engine" / "optimizer.pt").write_bytes(self.weights[::-1])


def controller(iteration: int) -> dict:
    return {"iteration": iteration, "history": [{"iteration": i + 1} for i in range(iteration)]}


def test_a_ppo_checkpoint_in_storage_is_committed_by_its_pointer_and_never_mixed(root, node):
    where = storage.join(root, "ppo/checkpoint")
    assert ppo_state.find(where) is None
    ppo_state.save(where, {"policy": _Trainers(b"it2"), "critic": _Trainers(b"c2")}, "tok", controller(2))
    found = ppo_state.find(where)
    assert found == storage.join(where, "iteration-000002")
    assert ppo_state.load_controller(found)["iteration"] == 2
    policy = Path(storage.localize(ppo_state.part(found, "policy")))
    assert (policy / "model.safetensors").read_bytes() == b"it2"

    # killed while the policy uploads iteration 4: the pointer still names iteration 2, whole
    with pytest.raises(RuntimeError, match="mid-upload"):
        ppo_state.save(where, {"policy": _Trainers(b"it4", fail_after=1)}, "tok", controller(4))
    assert ppo_state.find(where) == found and ppo_state.load_controller(found)["iteration"] == 2
    # every part uploaded, controller written, then stopped before the pointer moved: still iteration 2
    with pytest.raises(RuntimeError, match="before commit"):
        ppo_state.save(where, {"policy": _Trainers(b"it4")}, "tok", controller(4),
                       fail_before_commit=RuntimeError("stopped before commit"))
    assert ppo_state.find(where) == found
    node("node-b")  # a fresh machine reads the same committed checkpoint
    assert (Path(storage.localize(ppo_state.part(found, "policy"))) / "model.safetensors").read_bytes() == b"it2"
    assert ppo_state.part(found, "critic") is not None

    ppo_state.save(where, {"policy": _Trainers(b"it6")}, "tok", controller(6))  # the next save commits...
    assert ppo_state.find(where) == storage.join(where, "iteration-000006")
    assert storage.children(where) == ["iteration-000006", "latest.json"]  # ...and clears older and partial ones
    assert ppo_state.part(ppo_state.find(where), "critic") is None


def test_a_worker_never_asks_for_more_cpus_than_one_node_has():
    from unipipe_ray.runtime.cluster import worker_cpus

    assert worker_cpus(2, 2, 2) == 0.9  # 2 workers on a 2-core machine, the controller beside them
    assert worker_cpus(4, 4, 1) == 3.9  # one node: the worker takes it
    assert worker_cpus(4, 2, 1) == 1.9  # two 2-CPU nodes: 3.9 fits on neither; 1.9 fits on the survivor too
    assert worker_cpus(4, 2, 2) == 1.9
    assert worker_cpus(64, 16, 8) == 7.9
