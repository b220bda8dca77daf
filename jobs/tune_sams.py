"""The SamS settings search as a Ray job (docs/sams.md: keep ratio, lambda, scheduler lr, encoder; random + ASHA).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/tune_sams.py storage_path=/shared/runs/tune

Arguments are those of `unipipe tune` after the config: dotted overrides (`name=...`, `base.dpo.beta=0.5`,
`num_samples=8`); `--config FILE` picks another sweep (default tune_configs/sams.yaml).
Submitting the same command again resumes the sweep: finished trials are kept, errored and unfinished ones
run. The report lands in <storage_path>/<name>/sweep_report.md; `unipipe sweep-report DIR` rewrites it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir holds the package

from unipipe_ray.cli import main  # noqa: E402

DEFAULT = "tune_configs/sams.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["tune", *args] if "--config" in args else ["tune", "--config", DEFAULT, *args]))
