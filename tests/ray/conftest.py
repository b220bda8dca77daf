"""One local Ray cluster for all Ray tests (starting one costs ~4 s)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    import ray

    from tests.s3_local import use_credentials
    from unipipe_ray.runtime.cluster import init_ray

    use_credentials()  # before the cluster starts: its processes reach the local S3 server with them

    # 4 logical CPUs on a 2-core machine: CPU counts are scheduling tokens, and 2 workers plus Ray
    # Train's controller must fit (docs/design.md, "Running on small machines").
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
