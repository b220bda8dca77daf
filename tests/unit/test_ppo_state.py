"""PPO checkpoints are swapped in whole: a run stopped mid-swap, or after one, still finds a complete one."""

import json

from unipipe_ray.ppo import state as ppo_state


class FakeGroup:
    """Stands in for an actor group: save_checkpoint writes a marker file where the trainer would write."""

    def __init__(self, tag):
        self.tag = tag

    def call(self, method, directory, tokenizer_dir):
        assert method == "save_checkpoint"
        from pathlib import Path

        Path(directory).mkdir(parents=True)
        (Path(directory) / "weights").write_text(self.tag)


def test_save_swaps_in_whole_and_find_falls_back_to_the_old_copy(tmp_path):
    ckpt = tmp_path / "checkpoint"
    assert ppo_state.find(ckpt) is None
    ppo_state.save(ckpt, {"policy": FakeGroup("it2")}, "tok", {"iteration": 2})
    assert ppo_state.load_controller(ppo_state.find(ckpt))["iteration"] == 2
    # a stale .old from a crash after an earlier swap does not block the next save
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "junk").write_text("x")
    ppo_state.save(ckpt, {"policy": FakeGroup("it4"), "critic": FakeGroup("c4")}, "tok", {"iteration": 4})
    assert (ckpt / "policy" / "weights").read_text() == "it4" and (ckpt / "critic" / "weights").is_file()
    assert not (tmp_path / "checkpoint.old").exists() and not (tmp_path / "checkpoint.new").exists()
    # stopped mid-swap: the complete checkpoint sits at .old, the directory is gone, a half-built .new lies
    # around. find moves the old copy back under the checkpoint's name, so the trainers never load from a
    # directory that the next save deletes (the next save removes .old).
    ckpt.rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.new" / "policy").mkdir(parents=True)
    found = ppo_state.find(ckpt)
    assert found == ckpt and not (tmp_path / "checkpoint.old").exists()
    assert not (tmp_path / "checkpoint.new").exists()
    assert json.loads((found / "controller.json").read_text())["iteration"] == 4
    ppo_state.save(ckpt, {"policy": FakeGroup("it6")}, "tok", {"iteration": 6})
    assert (ckpt / "policy" / "weights").read_text() == "it6"


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint"
    ppo_state.save(ckpt, {"policy": FakeGroup("it2")}, "tok", {"iteration": 2})

    class DiskFull(FakeGroup):
        def call(self, method, directory, tokenizer_dir):
            super().call(method, directory, tokenizer_dir)
            raise OSError(28, "No space left on device")

    import pytest

    with pytest.raises(OSError, match="No space left"):
        ppo_state.save(ckpt, {"policy": DiskFull("it4")}, "tok", {"iteration": 4})
    found = ppo_state.find(ckpt)
    assert found == ckpt and ppo_state.load_controller(found)["iteration"] == 2
    assert (ckpt / "policy" / "weights").read_text() == "it2"
