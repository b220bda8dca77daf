"""The ``unipipe`` command.

    unipipe run --config FILE [--address ADDR] [key.sub=value ...]   (the chain SFT -> RM -> PPO -> DPO)
    unipipe sft|rm|dpo|ppo --config FILE [--address ADDR] [key.sub=value ...]
    unipipe sft ... --answer-eval N     (greedy answers before/after, scored by the task's checker)
    unipipe run|sft|rm|ppo|dpo|tune ... --mlflow URI   (also tracked in MLflow: runtime/tracking.py)
    unipipe eval|select ...             (evaluation with intervals, active selection: see eval/cli.py)
    unipipe tune|sweep-report ...       (Ray Tune sweeps and their report: see tune/cli.py)

With no ``--address`` (and no RAY_ADDRESS) a local Ray cluster starts on this machine. Running the same
command again resumes the stage from its latest checkpoint in ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import sys

from unipipe_ray.config import ConfigError, SFTConfig, load_config
from unipipe_ray.core import storage
from unipipe_ray.data.records import DataError
from unipipe_ray.eval import cli as eval_cli
from unipipe_ray.pipeline.registry import REGISTRY
from unipipe_ray.runtime import tracking
from unipipe_ray.runtime.files import RunLocked
from unipipe_ray.runtime.logs import setup_logging
from unipipe_ray.runtime.loop import NonFiniteLoss
from unipipe_ray.tune import cli as tune_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipipe", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, stage in REGISTRY.items():
        cmd = sub.add_parser(name, help=f"{stage.summary} on Ray")
        cmd.add_argument("--config", help="YAML file (defaults apply to missing keys)")
        cmd.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
        cmd.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
        tracking.add_arguments(cmd)
        if name == "sft":
            cmd.add_argument("--answer-eval", type=int, default=0, metavar="N",
                             help="answer N held-out prompts greedily before and after training; report the "
                                  "task checker's accuracy (tasks with a gold checker only)")
    run = sub.add_parser("run", help="the chained pipeline (SFT -> RM -> PPO -> DPO, any subset) with a report")
    run.add_argument("--config", help="pipeline YAML (see jobs/configs/quickstart.yaml)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. dpo.beta=0.2")
    tracking.add_arguments(run)
    eval_cli.add_parsers(sub)
    tune_cli.add_parsers(sub)
    return p


# Errors in what the user gave (data records, a model path, a resume that would mix configs), raised by a
# stage after Ray started: a message and exit 2 like a bad config, not a traceback and exit 1.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, RunLocked)


def _run_or_explain(command: str, fn, *args) -> tuple[object, int]:
    """(fn's result, 0), or (None, exit code) after a one-line message: 2 for a user error, 1 for a stop."""
    try:
        return fn(*args), 0
    except USER_ERRORS as e:
        print(f"unipipe {command}: {e}", file=sys.stderr)
        return None, 2
    except NonFiniteLoss as e:
        print(f"unipipe {command}: stopped: {e}", file=sys.stderr)
        return None, 1


def _in_storage(cfg, run):
    """A stage whose output_dir is a URI (s3://...) writes its checkpoints there itself, from the nodes it runs
    on; its driver files (config, result, history, tensorboard) go to a local copy, uploaded at the end, failed
    or not. Returns (the config to run, the runner, a function that uploads)."""
    import dataclasses
    import functools

    if not storage.is_uri(cfg.output_dir):
        return cfg, run, lambda: None
    from unipipe_ray.pipeline.rundir import RunDir

    uri = cfg.output_dir
    local = RunDir(uri).local  # checked by writing a file there: a bad URI stops here (ValueError)

    def upload():
        if local.is_dir():
            storage.upload_dir(local, uri)
    return dataclasses.replace(cfg, output_dir=str(local)), functools.partial(run, storage=uri), upload


def _run_pipeline(args) -> int:
    from unipipe_ray.config import PipelineConfig, load_config_with_keys
    from unipipe_ray.pipeline.run import run_pipeline

    try:
        cfg, given = load_config_with_keys(PipelineConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"unipipe: {e}", file=sys.stderr)
        return 2
    out, rc = _run_or_explain("run", run_pipeline, cfg, given, args.address)
    if rc:
        return rc
    print("\n== unipipe run: done ==")
    print(f"run directory: {out['run_dir']}  manifest: {out['manifest']}")
    if out.get("uri"):
        print(f"pushed to: {out['uri']} (the directory above is its local staging copy)")
    for stage, path in out["checkpoints"].items():
        print(f"  {stage}: {path}")
    if "report" in out:
        print(f"report: {out['report']}")
    return 0


def _answer_eval(cfg: SFTConfig, checkpoint: str | None, n: int) -> dict:
    from unipipe_ray.core.models import load_tokenizer
    from unipipe_ray.data.stage_data import load_stage_data, make_task
    from unipipe_ray.eval.generation import answer_accuracy

    task = make_task(cfg.data)
    if not task.has_gold_reward:
        raise SystemExit(f"--answer-eval: task {cfg.data.task!r} has no gold checker")
    _, _, held_out = load_stage_data(cfg.data, "sft", load_tokenizer(cfg.model))
    held_out = held_out[:n]
    out = {"before": answer_accuracy(cfg.model, task, held_out)}
    if checkpoint:
        out["after"] = answer_accuracy(checkpoint, task, held_out)
    return out


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parser().parse_args(argv)
    if args.command in eval_cli.COMMANDS:
        return eval_cli.run(args)
    tracking.configure(getattr(args, "mlflow", None), getattr(args, "mlflow_experiment", "unipipe"))
    try:
        tracking.check()  # a wrong URI or a missing MLflow stops here, before any training
    except ValueError as e:
        print(f"unipipe {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command in tune_cli.COMMANDS:
        return tune_cli.run(args)
    if args.command == "run":
        return _run_pipeline(args)
    stage = REGISTRY[args.command]
    try:
        cfg = load_config(stage.config, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"unipipe: {e}", file=sys.stderr)
        return 2
    shown = cfg.output_dir
    try:
        cfg, run, upload = _in_storage(cfg, stage.run)
    except ValueError as e:
        print(f"unipipe: {str(e).replace('run_dir', 'output_dir', 1)}", file=sys.stderr)
        return 2
    try:
        result, rc = _run_or_explain(args.command, run, cfg, args.address)
    finally:
        upload()
    if rc:
        return rc
    print(f"\n== unipipe {args.command}: done ==")
    print(f"model: {cfg.model}  data: {cfg.data.task if not cfg.data.sources else 'user sources'} "
          f"({result['train_examples']} train / {result['eval_examples']} held out)")
    print(f"time: {result['seconds']} s  checkpoint (Hugging Face format): {result['checkpoint']}")
    print("final metrics: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                         for k, v in (result["metrics"] or {}).items()}))
    if getattr(args, "answer_eval", 0):
        import ray

        ray.shutdown()  # the Ray processes are done; the CPU goes to generation (it ran ~10x slower beside them)
        acc = _answer_eval(cfg, result["checkpoint"], args.answer_eval)
        for when, a in acc.items():
            print(f"answer accuracy {when} SFT: {a['accuracy']:.3f} on {a['n']} held-out prompts "
                  f"(first answer: {a['example'][:120]!r})")
    print(f"result record: {storage.join(shown, 'result.json') if storage.is_uri(shown) else shown + '/result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
