"""The PPO stage as a Ray job.

    ray job submit --working-dir . -- python jobs/ppo.py --config FILE [key.sub=value ...]

Arguments are those of `unipipe ppo`. Inside a Ray job the driver attaches to that job's cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds the package

from unipipe_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
