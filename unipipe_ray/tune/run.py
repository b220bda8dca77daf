"""Run a sweep with Ray Tune: trials side by side as the cluster's CPUs (or GPUs) allow, restore of an
interrupted experiment, then the sweep report.

    unipipe tune --config tune_configs/allocation.yaml [--address ADDR] [key.sub=value ...]

Each trial is a function trainable that runs its stages through Ray Train (``TorchTrainer.fit()`` inside the
trial: Ray 2.60 refuses ``Tuner(TorchTrainer)``). The trial actor itself holds 0.01 CPU and its Ray Train
workers ``cpus_per_worker`` each, and no more trials run at once than the cluster holds all their workers:
otherwise a trial's workers wait for CPUs that the other trials' idle actors keep, forever (docs/design.md).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from unipipe_ray.config import TrainConfig, config_differences, to_dict
from unipipe_ray.core import storage
from unipipe_ray.runtime import tracking
from unipipe_ray.runtime.files import write_json_atomic
from unipipe_ray.runtime.logs import progress
from unipipe_ray.tune.config import TuneConfig

log = logging.getLogger(__name__)

TRIAL_CPU = 0.01  # the trial actor: it only waits on Ray Train and generates the held-out answers


def experiment_dir(cfg: TuneConfig) -> Path | str:
    """<storage_path>/<name>: a local path, or a URI when storage_path is one."""
    if storage.is_uri(cfg.storage_path):
        return storage.join(cfg.storage_path, cfg.name)
    return Path(cfg.storage_path).resolve() / cfg.name


def _under(exp_dir: Path | str, name: str) -> Path | str:
    return storage.join(exp_dir, name) if storage.is_uri(exp_dir) else Path(exp_dir) / name


def sweep_report(exp_dir: Path | str, metric: str, mode: str) -> Path | str:
    """The sweep report of an experiment directory; for a URI written in a local copy of its small files
    (the trials' stage runs, with their checkpoints, stay at the URI) and uploaded beside them."""
    from unipipe_ray.tune.report import write_sweep_report

    if not storage.is_uri(exp_dir):
        return write_sweep_report(exp_dir, metric=metric, mode=mode)
    from unipipe_ray.pipeline.rundir import staging_dir

    local = staging_dir(exp_dir)
    if not storage.download(exp_dir, local, skip=("stages/",)):
        raise FileNotFoundError(f"experiment directory {exp_dir} holds no files")
    path = write_sweep_report(local, metric=metric, mode=mode)
    for f in sorted(local.glob("sweep_*")):
        storage.write_bytes(_under(exp_dir, f.name), f.read_bytes())
    return _under(exp_dir, path.name)


def trial_demand(cfg: TuneConfig) -> tuple[float, int]:
    """(CPU tokens, GPUs) one trial's largest stage holds at once: the trial actor plus its workers."""
    stages: list[TrainConfig] = [getattr(cfg.base, s).train for s in cfg.base.stages]
    gpus = max((t.num_workers for t in stages if t.use_gpu), default=0)
    # a GPU worker takes Ray Train's default of 1 CPU (runtime.cluster.scaling ignores cpus_per_worker there)
    cpus = max(t.num_workers * (1.0 if t.use_gpu else t.cpus_per_worker or cfg.cpus_per_worker) for t in stages)
    return TRIAL_CPU + cpus, gpus


def eval_resources(cfg: TuneConfig) -> dict:
    """The held-out evaluation's Ray task: a GPU when the stages train on GPUs, else one worker's CPU share,
    both free once the stage before it has finished (so it never waits on another trial)."""
    cpus, gpus = trial_demand(cfg)
    return {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": min(cfg.cpus_per_worker, cpus - TRIAL_CPU)}


def concurrency(cfg: TuneConfig, cluster: dict) -> int:
    """How many trials fit side by side; a trial that can never fit is an error, not a silent wait."""
    cpus, gpus = trial_demand(cfg)
    have_cpu, have_gpu = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if cpus > have_cpu + 1e-9 or gpus > have_gpu:
        raise ValueError(f"one trial needs {cpus:g} CPU and {gpus} GPU at once, the cluster has {have_cpu:g} CPU "
                         f"and {have_gpu:g} GPU: lower cpus_per_worker or num_workers, or add nodes")
    fits = math.floor((have_cpu + 1e-9) / cpus)
    if gpus:
        fits = min(fits, int(have_gpu // gpus))
    if cfg.max_concurrent_trials and cfg.max_concurrent_trials > fits:
        log.warning("max_concurrent_trials=%s lowered to %s: no more trials fit the cluster's %g CPU / %g GPU "
                    "at once", cfg.max_concurrent_trials, fits, have_cpu, have_gpu)
    return max(1, min(fits, cfg.max_concurrent_trials or fits))


def param_space(cfg: TuneConfig) -> dict:
    from ray import tune

    samplers = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
                "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    space = {}
    for key, spec in cfg.space.items():
        if isinstance(spec, dict):
            kind, values = next(iter(spec.items()))
            space[key] = samplers[kind](values)
        else:
            space[key] = spec
    return space


def _absolute(path: str | None, must_exist: bool = False) -> str | None:
    """A relative local path made absolute against the launch directory (Tune runs each trial in its own
    directory). Model specs that are not local paths (smollm2-135m, tiny, hub ids) stay as they are."""
    if path is None or "://" in path or path.startswith("hf:"):
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    if must_exist and not p.exists():  # a model spec name, not a path
        return path
    return str(p.resolve())


def base_tree(cfg: TuneConfig) -> dict:
    """The base pipeline as a tree: every Ray Train stage's CPU share set (unless the user set it), and its
    relative paths (models, data files) made absolute."""
    tree = to_dict(cfg.base)
    tree["model"] = _absolute(tree["model"], must_exist=True)
    for stage in ("sft", "dpo"):
        section = tree[stage]
        train = section["train"]
        if train["cpus_per_worker"] is None and not train["use_gpu"]:
            train["cpus_per_worker"] = cfg.cpus_per_worker
        for key in ("model", "ref_model"):
            if key in section:
                section[key] = _absolute(section[key], must_exist=True)
        section["data"]["task_path"] = _absolute(section["data"]["task_path"])
        for source in section["data"]["sources"]:
            source["path"] = _absolute(source["path"])
    return tree


def _check_same_sweep(path: Path | str, config: dict, compare: bool) -> None:
    """Restoring runs the stored search; a changed YAML would silently not apply, so refuse and say what."""
    uri = storage.is_uri(path)
    stored = (storage.read_text(path) if uri else path.read_text() if path.exists() else None) if compare else None
    if stored is not None:
        diffs = [f"{k}: {a!r} -> {b!r}" for k, a, b in config_differences(json.loads(stored), config)
                 if not k.startswith("report")]
        if diffs:
            where = storage.split(path)[0].rsplit("/", 1)[0] if uri else path.parent
            raise ValueError(f"{where} holds a sweep started with another config ({'; '.join(diffs[:8])}); "
                             "restoring it would ignore the change. Use another name, or move that directory.")
    elif uri:
        storage.write_text(path, json.dumps(config, indent=2))
    else:
        write_json_atomic(path, config)


def run_tune(cfg: TuneConfig, given: set[str], address: str | None = None, inject: dict | None = None) -> Path:
    """Run (or resume) the sweep; return its experiment directory. ``given``: the base keys the user set
    (``dpo.model`` ...; config.given_keys under ``base.``). ``inject`` (tests): see tune_trial."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from unipipe_ray.runtime.cluster import init_ray
    from unipipe_ray.tune.trainable import tune_trial

    exp_dir = experiment_dir(cfg)
    init_ray(address)
    parallel = concurrency(cfg, ray.cluster_resources())
    cpus, _ = trial_demand(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, base=base_tree(cfg), given=sorted(given),
                             stages_root=str(_under(exp_dir, "stages")), metric=cfg.metric,
                             engine=cfg.eval_engine, eval_resources=eval_resources(cfg),
                             inject=inject),
        {"CPU": TRIAL_CPU})
    # A URI: Tune keeps its experiment there through a pyarrow filesystem, as Ray Train does for the stages.
    fs, where = storage.open_uri(str(exp_dir)) if storage.is_uri(exp_dir) else (None, str(exp_dir))
    restoring = tune.Tuner.can_restore(where, storage_filesystem=fs)
    # Written once the sweep starts (a sweep that never started can be re-run with a fixed config).
    _check_same_sweep(_under(exp_dir, "unipipe_tune.json"), to_dict(cfg), compare=restoring)
    # --mlflow: the sweep is one run, each trial a child run through Ray Tune's MLflow logger (a resumed sweep
    # keeps the logger it started with), the report and its plots the sweep run's artifacts
    with tracking.tracked_run(cfg.name, to_dict(cfg), {"unipipe.sweep": str(exp_dir)}) as sweep_run:
        if restoring:
            progress(f"tune: resuming {exp_dir}: finished trials are kept, errored and unfinished ones run")
            tuner = tune.Tuner.restore(where, trainable, resume_errored=True, storage_filesystem=fs)
        else:
            asha = cfg.asha
            scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=asha.max_t,
                                       grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
                                       stop_last_trials=False)  # a survivor runs to its end and final evaluation
                         if cfg.scheduler == "asha" else FIFOScheduler())
            progress(f"tune: {exp_dir}: up to {parallel} trial(s) at once ({cpus:g} CPU each)")
            tuner = tune.Tuner(
                trainable, param_space=param_space(cfg),
                tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                            num_samples=cfg.num_samples, max_concurrent_trials=parallel),
                run_config=tune.RunConfig(name=cfg.name, storage_path=where.rsplit("/", 1)[0],
                                          storage_filesystem=fs, callbacks=tracking.tune_callback(sweep_run)))
        results = tuner.fit()
        errors = [r for r in results if r.error is not None]
        progress(f"tune: {len(results)} trials, {len(errors)} errored" +
                 (" (run the same command again to retry them)" if errors else ""))
        if cfg.report:
            report = sweep_report(exp_dir, cfg.metric, cfg.mode)
            progress(f"tune: report {report}")
            if not storage.is_uri(report):
                tracking.log_artifacts(report, *sorted(Path(report).parent.glob("*.png")))
    return exp_dir
