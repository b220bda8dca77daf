"""A sweep's YAML: the base pipeline every trial runs, the search space, the search and the scheduler.

    name: allocation                 # experiment directory <storage_path>/<name>
    storage_path: runs/tune
    base: {model: ..., sft: {...}, dpo: {...}}   # a pipeline config; its stages default to [sft, dpo] here
    space:
      budget: {grid: [100, 400]}     # allocation keys: budget, sft_ratio, seed (see trainable.trial_config)
      sft_ratio: {grid: [1.0, 0.5, 0.0]}
      dpo.sams.explore_weight: {loguniform: [0.001, 0.1]}   # or any dotted key of the base pipeline
    search: grid                     # grid: every combination | random: num_samples draws
    scheduler: fifo                  # fifo: every trial runs to the end | asha: stop weak trials early

A space entry is a scalar (fixed), or a mapping with one of grid, choice, uniform, loguniform, randint.
Keys may be dotted (``dpo.beta``) or nested (``dpo: {beta: ...}``), so command-line overrides work too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unipipe_ray.config import (
    STAGES,
    ConfigError,
    PipelineConfig,
    build_config,
    check,
    one_of,
    set_dotted,
    to_dict,
)

ALLOCATION_KEYS = ("budget", "sft_ratio", "seed")  # mapped onto both stages' data by trainable.trial_config
SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")


def _default_base() -> PipelineConfig:
    return PipelineConfig(stages=("sft", "dpo"), report=False)


@dataclass(frozen=True)
class AshaConfig:
    max_t: int = 2                 # the top rung, in results (one per periodic eval and per finished stage);
                                   # a trial that survives the rungs still runs to its end
    grace_period: int = 1          # iterations before a trial can be stopped
    reduction_factor: int = 2      # keep the top 1/reduction_factor at each rung

    def __post_init__(self):
        for key in ("max_t", "grace_period", "reduction_factor"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.grace_period <= self.max_t, "grace_period", f"must be <= max_t={self.max_t}")


@dataclass(frozen=True)
class TuneConfig:
    name: str = "allocation"              # experiment name: results in <storage_path>/<name>
    storage_path: str = "runs/tune"       # Tune's storage: a local or shared path, or a URI (s3://, gs://)
    base: PipelineConfig = field(default_factory=_default_base)  # what every trial runs before its overrides
    space: dict[str, Any] = field(default_factory=dict)  # searched keys (see the module docstring)
    search: str = "grid"                  # grid | random
    num_samples: int = 1                  # random: draws; grid: repeats of the whole grid
    scheduler: str = "fifo"               # fifo | asha
    asha: AshaConfig = field(default_factory=AshaConfig)
    metric: str = "accuracy"              # accuracy | pref_accuracy | format_miss | ... (what a trial reports)
    mode: str = "max"                     # max | min
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs (or GPUs) hold
    cpus_per_worker: float = 0.9          # CPU tokens per Ray Train worker of a trial (CPU runs; 0.9 leaves
                                          # room for Ray's own actors so two trials fit on two cores)
    eval_engine: str = "hf"               # rollout engine of the held-out generation: hf | vllm
    report: bool = True                   # write sweep_report.md + PNGs into the experiment directory

    @staticmethod
    def normalise_tree(data: dict) -> dict:
        """The raw ``tune`` mapping before it is built (config.build_config calls this): the space flattened to
        dotted keys, and a base that leaves its stages out (or lists the whole pipeline chain, the pipeline's
        default) runs a trial's default, SFT -> DPO."""
        if isinstance(data.get("space"), dict):
            data["space"] = flatten_space(data["space"])
        base = data.get("base")
        if isinstance(base, dict):
            stages = base.get("stages", list(STAGES))
            if isinstance(stages, (list, tuple)) and list(stages) == list(STAGES):
                data["base"] = {**base, "stages": ["sft", "dpo"]}
        return data

    def __post_init__(self):
        one_of(self.search, "search", ("grid", "random"))
        one_of(self.scheduler, "scheduler", ("fifo", "asha"))
        one_of(self.mode, "mode", ("max", "min"))
        one_of(self.eval_engine, "eval_engine", ("hf", "vllm"))
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1, "max_concurrent_trials",
               f"must be >= 1 or null, got {self.max_concurrent_trials}")
        check(self.space == flatten_space(self.space), "space", "must have dotted keys (load_config flattens "
              "nested ones)")
        check(bool(self.space), "space", "names no key to search")
        check(set(self.base.stages) <= {"sft", "dpo"}, "base.stages",
               f"a trial runs sft and/or dpo, got {list(self.base.stages)}")
        for key, spec in self.space.items():
            check_space_entry(self.base, key, spec, self.search)
        budgeted = "budget" in self.space or self.base.sft.data.budget is not None
        check("sft_ratio" not in self.space or budgeted, "space.sft_ratio",
               "needs a budget (space.budget or base.sft.data.budget): without one every trial trains both stages "
               "on the whole pool")


def flatten_space(space: dict, prefix: str = "") -> dict:
    """``{dpo: {beta: {grid: [...]}}}`` (nested YAML, or a command-line override) -> ``{"dpo.beta": {...}}``."""
    flat = {}
    for key, spec in space.items():
        if isinstance(spec, dict) and spec and not set(spec) & set(SAMPLERS):
            flat.update(flatten_space(spec, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = spec
    return flat


def check_space_entry(base: PipelineConfig, key: str, spec: Any, search: str) -> None:
    """A space entry must name a real key of the base pipeline (or an allocation key) with a known sampler."""
    where = f"space.{key}"
    if isinstance(spec, dict):
        check(len(spec) == 1 and next(iter(spec)) in SAMPLERS, where,
               f"must be a value or a mapping with one of {', '.join(SAMPLERS)}, got {spec}")
        kind, values = next(iter(spec.items()))
        check(isinstance(values, list) and values, where, f"{kind} needs a non-empty list, got {values!r}")
        check(kind in ("grid", "choice") or len(values) == 2, where, f"{kind} needs [low, high], got {values}")
        check(search == "random" or kind == "grid", where,
               f"search: grid enumerates grid entries only; {kind} needs search: random")
        samples = values if kind in ("grid", "choice") else values[:1]
    else:
        samples = [spec]
    if key in ALLOCATION_KEYS:
        return
    for value in samples:  # build the base with the value: a wrong key or value fails here, named
        tree = to_dict(base)
        try:
            set_dotted(tree, key, value)
            build_config(PipelineConfig, tree)
        except ValueError as e:  # ConfigError is one
            raise ConfigError(where, f"{value!r} does not fit the base pipeline ({e})") from None
