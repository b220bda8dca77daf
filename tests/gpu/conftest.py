"""The device check's fixtures: which device and model it checks, one local Ray cluster (with the GPU when
there is one), and a figures file that bench/gpu_check.sh puts in its report.

    UNIPIPE_CHECK_DEVICE   cuda (default) | cpu: where the bf16 runs go (bench/gpu_check.sh --cpu sets cpu)
    UNIPIPE_CHECK_MODEL    model spec of the SFT and DPO runs: tiny (default) | smollm2-135m | a checkpoint dir
    UNIPIPE_CHECK_FIGURES  a JSON-lines file each test appends its figures to (unset: none written)
"""

import json
import os
from pathlib import Path

import pytest

DEVICE = os.environ.get("UNIPIPE_CHECK_DEVICE", "cuda")
MODEL = os.environ.get("UNIPIPE_CHECK_MODEL", "tiny")


@pytest.fixture(scope="session")
def device() -> str:
    """The device type under test. Asking for CUDA where there is none fails the check rather than skipping
    it: a GPU check that quietly ran nothing must not read as a pass."""
    import torch

    if DEVICE not in ("cuda", "cpu"):
        pytest.fail(f"UNIPIPE_CHECK_DEVICE={DEVICE!r}: expected cuda or cpu")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("UNIPIPE_CHECK_DEVICE=cuda, but torch sees no CUDA device (UNIPIPE_CHECK_DEVICE=cpu, or "
                    "bash bench/gpu_check.sh --cpu, runs the same checks on the CPU)")
    return DEVICE


@pytest.fixture(scope="session")
def ray_cluster(device):
    """One local Ray cluster for the check. Ray finds the GPUs itself; the CPU count is at least 4 logical
    CPUs (scheduling tokens: on a 2-core machine a worker, Ray Train's controller and PPO's roles must fit)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    import ray

    from unipipe_ray.runtime.cluster import init_ray

    init_ray(num_cpus=max(4, os.cpu_count() or 1))
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and gpus < 1:
        ray.shutdown()
        pytest.fail(f"the local Ray cluster has {gpus} GPUs; the check needs one")
    yield ray
    ray.shutdown()


@pytest.fixture
def record(request):
    """record(**figures): append this test's figures (JSON-able) to $UNIPIPE_CHECK_FIGURES, one line per call."""
    path = os.environ.get("UNIPIPE_CHECK_FIGURES")

    def write(**figures):
        if path:
            line = {"test": request.node.name, "device": DEVICE, **figures}
            with Path(path).open("a") as f:
                f.write(json.dumps(line, default=str) + "\n")

    return write
