"""Two drivers on one run_dir: the second is refused with the first's name and changes nothing."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unipipe_ray.cli import main
from unipipe_ray.config import PipelineConfig, load_config
from unipipe_ray.pipeline.run import run_pipeline
from unipipe_ray.runtime import files
from unipipe_ray.runtime.files import RunLocked, run_lock

ROOT = str(Path(files.__file__).parents[1])


def hold(directory):
    """A child process that takes the lock, says so, and holds it until its stdin closes."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from unipipe_ray.runtime.files import run_lock
        with run_lock({str(directory)!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "held\n"
    return child


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_driver_is_refused_and_the_first_run_is_untouched(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "sft" / "sft" / "checkpoint_000000").mkdir(parents=True)
    (run_dir / "sft" / "sft" / "checkpoint_000000" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "manifest.json").write_text('{"stages": {"sft": {"status": "running"}}}')
    child = hold(run_dir)
    try:
        before = snapshot(run_dir)
        cfg = load_config(PipelineConfig, overrides=[f"run_dir={run_dir}", "model=tiny"])
        with pytest.raises(RunLocked, match=rf"{run_dir} is in use by pid {child.pid} on "):
            run_pipeline(cfg, set())
        assert main(["run", f"run_dir={run_dir}", "model=tiny"]) == 2
        assert f"pid {child.pid}" in capsys.readouterr().err
        assert snapshot(run_dir) == before
    finally:
        child.stdin.close()
        child.wait()
    # the holder is gone (however it ended): the lock is free again, no stale file blocks the next run
    with run_lock(run_dir) as path:
        assert f"pid {__import__('os').getpid()}" in path.read_text()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    child = hold(tmp_path)
    child.kill()
    child.wait()
    with run_lock(tmp_path):
        with pytest.raises(RunLocked):  # and within one process a second holder is refused too
            with run_lock(tmp_path):
                pass
