"""Ray on the driver: connect to a cluster (or start a local one) and size a stage's Ray Train workers."""

from __future__ import annotations

import json
import math
import os

from unipipe_ray.config import TrainConfig


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local cluster on this machine."""
    import ray

    if ray.is_initialized():
        return
    # Ray Train blocks ~2 s in every report() at the default health-check interval; 0.1 s keeps it cheap.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Workers must not pick a GPU accelerator that is not there (DeepSpeed probes at import).
    # Inside a Ray job the job's runtime env already reaches every worker, and Ray refuses to merge a key it
    # sets with ours ("Failed to merge the Job's runtime env"): pass only what the job leaves unset.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}) or {}
    taken = set(job_env.get("env_vars") or {})
    env = {k: os.environ[k] for k in ("UNIPIPE_CACHE", "UNIPIPE_SMOLLM2_GGUF", "UNIPIPE_SHARED_DATA",
                                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "UNIPIPE_RAY_METRICS")
           if k in os.environ}
    # Weight-loading and saving bars from every worker fill the job log with redraws; the progress lines
    # already say what happens. HF_HUB_DISABLE_PROGRESS_BARS=0 in the driver's environment keeps them.
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    runtime_env = {"env_vars": {k: v for k, v in env.items() if k not in taken}}
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env,
             num_cpus=num_cpus, log_to_driver=True)


def scaling(train: TrainConfig):
    """ScalingConfig for a stage: workers share the local CPUs (Ray's CPU counts are scheduling tokens)."""
    import ray
    from ray.train import ScalingConfig

    if train.use_gpu:
        return ScalingConfig(num_workers=train.num_workers, use_gpu=True), 1
    if train.cpus_per_worker is not None:
        return ScalingConfig(num_workers=train.num_workers, resources_per_worker={"CPU": train.cpus_per_worker}), \
            max(1, round(train.cpus_per_worker))
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    per_worker = worker_cpus(ray.cluster_resources().get("CPU", 1), largest, train.num_workers)
    return ScalingConfig(num_workers=train.num_workers, resources_per_worker={"CPU": per_worker}), \
        max(1, int(per_worker + 0.1))


def worker_cpus(cluster_cpus: float, largest_node_cpus: float, num_workers: int) -> float:
    """Each worker's CPU share: the cluster's CPUs split evenly, less 0.1 (room for Ray Train's controller,
    so 2 workers fit on a 2-core machine), at least 0.9, and never more than one node has: a worker runs on
    one node, and one restarted after its node died must fit on another."""
    share = math.floor(cluster_cpus / num_workers * 10) / 10 - 0.1
    return max(0.9, min(share, largest_node_cpus - 0.1))
