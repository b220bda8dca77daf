"""cluster/ and the Ray job files: every YAML parses; the launcher config passes Ray's own validation; the runtime
env is one Ray accepts and its excludes keep runs, venvs and weights out of the working-dir upload (checked by
zipping with Ray's packager); the KubeRay manifests give GPU workers and one shared volume; the RayJob's command
is accepted by the real pipeline config schema. No cluster is started."""

import copy
import re
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
# What unipipe_ray.runtime.cluster.init_ray forwards through ray.init's runtime env (a job may not set them too).
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
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):  # the port cluster/README.md names
        assert any("ray start" in c and "--metrics-export-port=8080" in c for c in cfg[key]), key
    for local in cfg["file_mounts"].values():
        if not local.startswith("~"):  # ~/.ray/auth_token lives on the user's machine
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
        env = {e["name"]: e.get("value") for e in container["env"]}
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


# ------------------------------------------------------------------------------------------------ security

PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}


def aws_problems(cfg: dict) -> list[str]:
    """What in the launcher config would let someone other than the cluster's users run code on it."""
    problems = []
    if "-e RAY_AUTH_MODE=token" not in cfg["docker"]["run_options"]:
        problems.append("aws: RAY_AUTH_MODE=token missing from docker.run_options")
    if not any(remote.endswith(".ray/auth_token") for remote in cfg.get("file_mounts", {})):
        problems.append("aws: no auth token shipped to the nodes (file_mounts)")
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    if "--dashboard-host=127.0.0.1" not in starts or "0.0.0.0" in starts:
        problems.append("aws: the dashboard / job API is not bound to the head's loopback")
    for command in cfg.get("initialization_commands", []) + cfg.get("setup_commands", []):
        for mode in re.findall(r"chmod\s+(?:-R\s+)?(\S+)", command):
            if re.fullmatch(r"[0-7]{3,4}", mode) and mode[-1] != "0" or "o+" in mode or mode.startswith("a+"):
                problems.append(f"aws: '{command}' opens files to every user of the node")
    return problems


def ray_containers(docs: dict) -> list[dict]:
    spec = docs["RayCluster"]["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["containers"]]


def token_env_problems(container: dict, where: str) -> list[str]:
    env = {e["name"]: e for e in container.get("env", [])}
    problems = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not token")
    if "secretKeyRef" not in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}):
        problems.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret")
    return problems


def kuberay_problems(docs: dict, rayjob: dict) -> list[str]:
    problems = []
    cluster = docs["RayCluster"]
    for container in ray_containers(docs):
        problems += token_env_problems(container, f"kuberay {container['name']}")
        if any("hostPort" in port for port in container.get("ports", [])):
            problems.append(f"kuberay {container['name']}: a hostPort publishes a Ray port on the node")
    head = cluster["spec"]["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") in PUBLIC_SERVICE_TYPES:
        problems.append(f"kuberay: head service type {head['serviceType']} is public")
    if any(d.get("spec", {}).get("type") in PUBLIC_SERVICE_TYPES for k, d in docs.items() if k == "Service"):
        problems.append("kuberay: a public Service")
    name = cluster["metadata"]["name"]
    policy = docs.get("NetworkPolicy")
    if policy is None or policy["spec"]["podSelector"].get("matchLabels") != {"ray.io/cluster": name}:
        problems.append("kuberay: no NetworkPolicy guards the Ray pods")
    else:
        sources = [src for rule in policy["spec"].get("ingress", []) for src in (rule.get("from") or [None])]
        if any(src is None or "podSelector" not in src for src in sources):
            problems.append("kuberay: the NetworkPolicy admits traffic from outside the cluster's own pods")
        admitted = [src["podSelector"].get("matchLabels", {}) for src in sources if src and "podSelector" in src]
        submitter = rayjob["spec"].get("submitterPodTemplate", {})
        labels = submitter.get("metadata", {}).get("labels", {})
        if not any(m and m.items() <= labels.items() for m in admitted):
            problems.append("kuberay: the RayJob submitter pod is not admitted by the NetworkPolicy")
    submitter_containers = rayjob["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])
    if not submitter_containers:
        problems.append("rayjob: no submitter pod template carrying the token")
    for container in submitter_containers:
        problems += token_env_problems(container, "rayjob submitter")
    return problems


def shipped():
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    return aws, kuberay(), yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())


def test_cluster_configs_require_the_token_and_publish_no_port():
    aws, docs, rayjob = shipped()
    assert aws_problems(aws) == []
    assert kuberay_problems(docs, rayjob) == []


def test_the_security_check_catches_each_weakening():
    """Each way of opening the cluster, applied to a copy of the shipped files, is reported."""
    def weakened(change):
        aws, docs, rayjob = copy.deepcopy(shipped())
        change(aws, docs, rayjob)
        return aws_problems(aws) + kuberay_problems(docs, rayjob)

    def public_dashboard(aws, docs, rayjob):
        aws["head_start_ray_commands"] = [c.replace("127.0.0.1", "0.0.0.0") for c in aws["head_start_ray_commands"]]

    def worker_auth_off(aws, docs, rayjob):
        env = docs["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
        env[:] = [e for e in env if e["name"] != "RAY_AUTH_MODE"]

    def token_in_plain_text(aws, docs, rayjob):
        for e in rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]:
            if e["name"] == "RAY_AUTH_TOKEN":
                e.pop("valueFrom")
                e["value"] = "secret"

    cases = {
        "aws auth off": (lambda a, d, r: a["docker"]["run_options"].remove("-e RAY_AUTH_MODE=token"), "RAY_AUTH_MODE"),
        "aws dashboard public": (public_dashboard, "loopback"),
        "aws world-writable /shared": (lambda a, d, r: a["initialization_commands"].append("sudo chmod 1777 /shared"),
                                       "every user"),
        "kuberay worker auth off": (worker_auth_off, "RAY_AUTH_MODE is not token"),
        "kuberay token in plain text": (token_in_plain_text, "does not come from a Secret"),
        "kuberay LoadBalancer": (lambda a, d, r: d["RayCluster"]["spec"]["headGroupSpec"].update(
            serviceType="LoadBalancer"), "public"),
        "kuberay no NetworkPolicy": (lambda a, d, r: d.pop("NetworkPolicy"), "NetworkPolicy"),
        "kuberay policy open to all": (lambda a, d, r: d["NetworkPolicy"]["spec"]["ingress"].append({}),
                                       "outside the cluster"),
    }
    for name, (change, expected) in cases.items():
        problems = weakened(change)
        assert any(expected in p for p in problems), (name, problems)
