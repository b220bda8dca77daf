"""``unipipe tune`` and ``unipipe sweep-report``.

    unipipe tune --config tune_configs/allocation.yaml [--address ADDR] [key.sub=value ...]
    unipipe sweep-report runs/tune/allocation [--metric accuracy --mode max]

Running the same ``unipipe tune`` command again resumes the experiment: finished trials are kept, errored
and unfinished ones run (inside a trial, finished stages are skipped).
"""

from __future__ import annotations

import argparse
import sys

from unipipe_ray.runtime import tracking

COMMANDS = ("tune", "sweep-report")


def add_parsers(sub) -> None:
    t = sub.add_parser("tune", help="Ray Tune sweep (SFT/preference budget split, SamS settings) with a report")
    t.add_argument("--config", required=True, help="sweep YAML (see tune_configs/)")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides, e.g. name=try2 base.dpo.beta=0.5")
    tracking.add_arguments(t)
    r = sub.add_parser("sweep-report", help="write sweep_report.md + PNGs from a Tune experiment directory")
    r.add_argument("experiment_dir", help="<storage_path>/<name> of a sweep (a path or a URI)")
    r.add_argument("--metric", default="accuracy", help="the metric to rank trials by (default accuracy)")
    r.add_argument("--mode", default="max", choices=("max", "min"))


def base_keys(given: set[str]) -> set[str]:
    """The keys the user set under ``base:`` (they win over the chain's defaults inside each trial), from the
    sweep's given keys (config.load_config_with_keys)."""
    return {k[len("base."):] for k in given if k.startswith("base.")}


def run(args: argparse.Namespace) -> int:
    from unipipe_ray.config import ConfigError, load_config_with_keys

    if args.command == "sweep-report":
        from unipipe_ray.tune.run import sweep_report

        try:
            print(f"sweep report: {sweep_report(args.experiment_dir, args.metric, args.mode)}")
        except (FileNotFoundError, ValueError) as e:
            print(f"unipipe sweep-report: {e}", file=sys.stderr)
            return 2
        return 0
    from unipipe_ray.tune.config import TuneConfig
    from unipipe_ray.tune.run import run_tune

    try:
        cfg, given = load_config_with_keys(TuneConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"unipipe tune: {e}", file=sys.stderr)
        return 2
    exp_dir = run_tune(cfg, base_keys(given), args.address)
    print(f"\n== unipipe tune: done ==\nexperiment: {exp_dir}")
    return 0
