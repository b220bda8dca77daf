"""The chained pipeline (SFT -> RM -> PPO -> DPO) as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/pipeline.py --config jobs/configs/quickstart.yaml run_dir=/shared/runs/quickstart

Arguments are those of `unipipe run` (dotted overrides, `--mlflow URI` included). Inside a Ray job RAY_ADDRESS
names the job's cluster, so the driver attaches to it instead of starting a local one. On a multi-node cluster
run_dir must be storage every node reaches: a path every node mounts (NFS, EFS, a ReadWriteMany volume) or an
object-store URI (s3://bucket/runs/x): the stages write their checkpoints there. Submitting the same command
again resumes the run (finished stages are skipped).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds the package

from unipipe_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
