"""cluster/ and the Ray job files: every YAML parses; the launcher config passes Ray's own validation; the runtime
env is one Ray accepts and its excludes keep runs, venvs and weights out of the working-dir upload (checked by
zipping with Ray's packager); the KubeRay manifests give GPU workers and one shared volume; the RayJob's command
is accepted by the real pipeline config schema. No cluster is started."""

import copy
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from unipipe_ray.config import STAGES, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"
# What unipipe_ray.stages.common.init_ray forwards through ray.init's runtime env (a job may not set them too).
FORWARDED = {"UNIPIPE_CACHE", "UNIPIPE_SMOLLM2_GGUF", "UNIPIPE_SHARED_DATA", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
SHARED = "/shared"


def load_all(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("ray[") or d.startswith("ray=="))


def kuberay() -> dict:
    return {doc["kind"]: doc for doc in load_all(CLUSTER / "kuberay-raycluster.yaml")}


def dockerfile_workdir() -> str:
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    return next(line.split()[1] for line in lines if line.startswith("WORKDIR"))


def test_every_yaml_file_parses_into_mappings():
    files = sorted(CLUSTER.glob("*.yaml")) + [RUNTIME_ENV]
    assert len(files) >= 4
    for path in files:
        docs = load_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_runtime_env_is_accepted_by_ray_and_cannot_clash_with_the_driver():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(RUNTIME_ENV.read_text())
    RuntimeEnv(**env)  # Ray's own type checks (excludes: list of str, env_vars: str -> str)
    assert "working_dir" not in env  # given on the command line (--working-dir .)
    env_vars = env.get("env_vars", {})
    # A key set by both the job and ray.init inside it fails the job unless the override flag is on.
    assert not FORWARDED & set(env_vars) or env_vars.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1"


def test_runtime_env_excludes_keep_heavy_files_out_of_the_upload(tmp_path):
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    if not hasattr(packaging, "_zip_files"):
        pytest.skip("Ray's packager moved")
    kept = ["unipipe_ray/__init__.py", "unipipe_ray/data/arith.py", "jobs/pipeline.py", "jobs/configs/quickstart.yaml",
            "pyproject.toml", "my_pairs.jsonl"]
    dropped = [".git/HEAD", ".venv/bin/python", "unipipe_ray/__pycache__/config.cpython-311.pyc",
               "runs/quickstart/manifest.json", "runs/quickstart/sft/sft/checkpoint_000001/model.safetensors",
               "out/sft/tensorboard/events.out.tfevents.1", "results/bench.md", "data/train.parquet",
               "hh.jsonl.gz", "model.gguf", "pytorch_model.bin"]
    repo = tmp_path / "repo"
    for name in kept + dropped:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    excludes = yaml.safe_load(RUNTIME_ENV.read_text())["excludes"]
    # Without .gitignore (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 clusters): the excludes alone must do it.
    packaging._zip_files(str(repo), excludes, str(tmp_path / "pkg.zip"), include_gitignore=False)
    names = set(zipfile.ZipFile(tmp_path / "pkg.zip").namelist())
    assert set(kept) <= names
    assert not names & set(dropped), names & set(dropped)


def test_launcher_config_passes_rays_validation_and_matches_the_project():
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("Ray's cluster-launcher validation is not importable")
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs first (schema + defaults)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray_pin()}-")
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any("pip install" in c and " -e " in c and "[vllm]" in c for c in cfg["setup_commands"])
    assert f"-v {SHARED}:{SHARED}" in cfg["docker"]["run_options"]
    for local in cfg["file_mounts"].values():
        assert (ROOT / local).exists(), local


def test_kuberay_cluster_has_gpu_workers_and_one_shared_volume_everywhere():
    docs = kuberay()
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = docs["RayCluster"]["spec"]
    assert spec["rayVersion"] == ray_pin()
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    images = set()
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        container = pod["containers"][0]
        images.add(container["image"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims.get(mounts.get(SHARED)) == docs["PersistentVolumeClaim"]["metadata"]["name"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["UNIPIPE_CACHE"].startswith(SHARED + "/")
    assert len(images) == 1  # one Ray and one torch on every pod
    gpus = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in spec["workerGroupSpecs"]]
    assert max(gpus) > 0
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_runs_jobs_pipeline_with_a_command_the_config_schema_accepts():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == kuberay()["RayCluster"]["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{dockerfile_workdir()}/jobs/pipeline.py"
    config = argv[argv.index("--config") + 1]
    local = ROOT / Path(config).relative_to(dockerfile_workdir())  # the image holds this checkout's files
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    cfg = load_config(PipelineConfig, local, overrides)
    assert cfg.run_dir.startswith(SHARED + "/")
    assert all(getattr(cfg, stage).train.use_gpu for stage in STAGES)
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))


def test_pipeline_job_entrypoint_is_unipipe_run(tmp_path):
    # From another directory, as Ray runs it: the script finds the package next to itself.
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "unipipe run" in out.stdout and "--config" in out.stdout
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(tmp_path / "no.yaml")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no.yaml" in out.stderr
