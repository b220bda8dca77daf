"""Frozen, validated configuration: one dataclass per stage and the chained pipeline's.

``load_config(SFTConfig, "sft.yaml", ["train.lr=1e-5"])`` reads the YAML, applies the overrides, rejects
unknown keys and out-of-range values with an error naming the file and the dotted key, and returns the
frozen dataclass (the reading itself lives in reader.py). Every field has a default and a comment saying
what it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unipipe_ray.config.reader import check, one_of
from unipipe_ray.config.sams import SamsSettings

DEFAULT_MODEL = "smollm2-135m"  # the packaged SmolLM2-135M-Instruct (core/models.py resolves specs)


@dataclass(frozen=True)
class DataSource:
    path: str                 # JSONL/JSON/Parquet file (optionally .gz), a `datasets` dir, or hf:<id>[:split]
    weight: float = 1.0       # relative share of this source in a mixture

    def __post_init__(self):
        check(bool(self.path), "path", "must not be empty")
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


@dataclass(frozen=True)
class DataConfig:
    task: str = "arith"                     # built-in task: arith (generated) | gsm8k | hh_harmless
    task_path: str | None = None            # data file of a file-backed task (gsm8k, hh_harmless)
    task_size: int = 2000                   # examples the generated `arith` task makes
    sources: tuple[DataSource, ...] = ()    # user data instead of the task's (weighted mixture)
    size: int | None = None                 # take this many training examples (None: all)
    budget: int | None = None               # split this many of the task's training questions between SFT
                                            # and preference data (data.split.budget_split): an sft stage
                                            # takes round(budget * sft_ratio), a preference stage the rest
    sft_ratio: float = 1.0                  # share of the budget spent on SFT examples
    budget_seed: int = 0                    # which questions the budget draws (training order: train.seed)
    eval_size: int = 64                     # held-out examples for evaluation, split off before training
    max_length: int = 256                   # tokens per sequence (prompt + response)
    max_prompt_length: int | None = None    # prompt tokens kept (from the end); None: max_length // 2
    on_bad_record: str = "error"            # error: stop at the first bad record | skip: skip and report
                                            # (user sources and the gsm8k / hh_harmless task files alike)
    seed: int = 0                           # held-out split, generated task, source mixing; the
                                            # training order and PPO's prompt draw follow train.seed
    cache_dir: str | None = None            # tokenized-data cache, a path or URI every node can read
                                            # (None: <storage>/data_cache, else data_cache beside output_dir)
    tokenize_with: str = "auto"             # ray_data: tokenize shards on the cluster | driver: in the
                                            # launching process | auto: Ray Data from 8 MB of input

    def __post_init__(self):
        one_of(self.task, "task", ("arith", "gsm8k", "hh_harmless"))
        one_of(self.tokenize_with, "tokenize_with", ("auto", "ray_data", "driver"))
        one_of(self.on_bad_record, "on_bad_record", ("error", "skip"))
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        check(self.max_prompt_length is None or 0 < self.max_prompt_length < self.max_length,
               "max_prompt_length", f"must be in (0, max_length={self.max_length}), got {self.max_prompt_length}")
        check(self.size is None or self.size > 0, "size", f"must be > 0 or null, got {self.size}")
        check(self.budget is None or self.budget > 0, "budget", f"must be > 0 or null, got {self.budget}")
        check(self.budget is None or self.size is None, "budget", "set budget or size, not both")
        check(self.budget is None or not self.sources, "budget",
               "splits one task's question pool (index i is the same question in its SFT and preference data); "
               "it cannot split user sources")
        check(0 <= self.sft_ratio <= 1, "sft_ratio", f"must be in [0, 1], got {self.sft_ratio}")
        check(self.eval_size >= 0, "eval_size", f"must be >= 0, got {self.eval_size}")
        check(self.task_size > 0, "task_size", f"must be > 0, got {self.task_size}")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False      # train LoRA adapters (PEFT) instead of all weights
    r: int = 16                # adapter rank
    alpha: int = 32            # scaling numerator (scale = alpha / r)
    dropout: float = 0.0       # dropout on the adapter input
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # module names to adapt

    def __post_init__(self):
        check(self.r > 0, "r", f"must be > 0, got {self.r}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 1           # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False          # one GPU per worker
    batch_size: int = 4            # examples per worker per micro-step
    grad_accum: int = 1            # micro-steps per optimizer step
    epochs: float = 1.0            # passes over the training data (max_steps wins when set)
    max_steps: int | None = None   # stop after this many optimizer steps
    lr: float = 1e-5               # peak learning rate (AdamW)
    weight_decay: float = 0.0      # AdamW weight decay
    warmup_ratio: float = 0.1      # share of steps with linear warmup, then cosine decay to 0
    max_grad_norm: float = 1.0     # gradient clipping (0 disables)
    dtype: str = "float32"         # float32 | bfloat16 weights and compute
    backend: str = "ddp"           # ddp: torch DDP (gloo on CPU, NCCL on GPU) | deepspeed: DeepSpeed ZeRO
    zero_stage: int = 0            # DeepSpeed ZeRO stage 0-3 (backend: deepspeed)
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory
    logps_chunk_size: int = 1024   # LM head run in chunks over target tokens only, no full fp32 logits
                                   # (0: full logits; ZeRO-3 always uses full logits, its head is partitioned)
    packing: bool | str = "auto"   # padding-free forward (sft, rm, dpo): each micro-batch's sequences packed
                                   # into rows without padding, position ids restarting per sequence, attention
                                   # kept inside each (core/packing.py); same losses and gradients as padded.
                                   # auto: a micro-batch is packed when that drops >= 20% of its positions (and
                                   # the model's attention honours it, else padded); true: always; false: never
    eval_every: int = 0            # evaluate on the held-out split every k steps (0: only at the end)
    log_every: int = 1             # report metrics every k steps
    checkpoint_every: int = 0      # save a resumable checkpoint every k steps (0: only at the end)
    checkpoint_minutes: float = 10.0  # also save once this many minutes passed since the last save (0: off):
                                   # a dead worker or job loses at most about this much work
    max_failures: int = 2          # worker-group restarts (from the last checkpoint) before giving up
    cpus_per_worker: float | None = None  # CPU tokens per worker; None: the workers share the whole cluster
                                   # (a Tune sweep sets it so that several trials fit side by side)
    seed: int = 0                  # model init / dropout / order of the training data / PPO's prompts
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        for key in ("num_workers", "batch_size", "grad_accum", "log_every"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(0 < self.lr < 1, "lr", f"must be in (0, 1), got {self.lr}")
        check(0 <= self.weight_decay < 1, "weight_decay", f"must be in [0, 1), got {self.weight_decay}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        one_of(self.dtype, "dtype", ("float32", "bfloat16"))
        check(isinstance(self.packing, bool) or self.packing == "auto", "packing",
              f"must be true, false or auto, got {self.packing!r}")
        one_of(self.zero_stage, "zero_stage", (0, 1, 2, 3))
        one_of(self.backend, "backend", ("ddp", "deepspeed"))
        check(self.zero_stage == 0 or self.backend == "deepspeed", "zero_stage",
               "needs backend: deepspeed")
        check(not self.offload_optimizer or self.backend == "deepspeed", "offload_optimizer",
               "needs backend: deepspeed")
        check(self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker",
               f"must be > 0 or null, got {self.cpus_per_worker}")
        for key in ("checkpoint_every", "max_failures", "logps_chunk_size", "checkpoint_minutes"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")


def chunk_size(train: TrainConfig) -> int | None:
    """The log-prob chunk size a stage uses: None (full logits) when off or under ZeRO-3."""
    return train.logps_chunk_size if train.logps_chunk_size and train.zero_stage != 3 else None


@dataclass(frozen=True)
class SFTConfig:
    model: str = DEFAULT_MODEL     # model spec: smollm2-135m | tiny | HF dir | .gguf file | hub id
    output_dir: str = "runs/sft"   # checkpoints and metrics go here
    sams_pretrain: bool = False    # pretrain SamS's nets on the SFT loss (docs/sams.md); DPO starts from them
    sams: SamsSettings = field(default_factory=SamsSettings)  # the scheduler those nets belong to (sams_pretrain)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class RMConfig:
    model: str = DEFAULT_MODEL     # model spec the scalar head is put on
    output_dir: str = "runs/rm"
    margin: float = 0.0            # Bradley-Terry margin
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")


@dataclass(frozen=True)
class OwnPairs:
    """``dpo.pairs: own``: how the stage samples its pairs from its input policy (pipeline/own_pairs.py)."""

    samples: int = 4               # answers sampled per prompt (the best and the worst make its pair)
    temperature: float = 1.0       # sampling temperature
    max_new_tokens: int = 128      # answer length limit
    engine: str = "hf"             # rollout engine that samples: hf | vllm (as PPO's)
    seed: int | None = None        # the draw (same seed, same pairs); None: train.seed
    eval_prompts: int | None = None  # held-out prompts sampled for the stage's eval pairs (its eval loss and
                                   # accuracy); None: all data.eval_size of them
    rule: str | None = None        # "module:function" (example, text, response_ids) -> float scoring the
                                   # answers instead of the task's checker (then data.sources work too)
    reward_model: str | None = None  # a reward model (the rm stage's checkpoint) scoring the answers instead
                                   # of the checker; in a chain, the RM's when the data has no checker

    def __post_init__(self):
        check(self.samples >= 2, "samples", f"must be >= 2 (a pair needs two answers), got {self.samples}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.eval_prompts is None or self.eval_prompts >= 0, "eval_prompts",
              f"must be >= 0 or null, got {self.eval_prompts}")
        one_of(self.engine, "engine", ("hf", "vllm"))
        check(self.rule is None or ":" in self.rule, "rule", f"must be module:function, got {self.rule!r}")
        check(self.rule is None or self.reward_model is None, "rule", "set rule or reward_model, not both")


@dataclass(frozen=True)
class DPOConfig:
    model: str = DEFAULT_MODEL     # policy init
    ref_model: str | None = None   # reference; None: the policy's init
    output_dir: str = "runs/dpo"
    loss_type: str = "sigmoid"     # sigmoid (DPO) | ipo | simpo
    beta: float = 0.1              # inverse temperature of the implicit reward
    label_smoothing: float = 0.0   # cDPO: assumed share of flipped labels, in [0, 0.5)
    simpo_gamma: float = 0.5       # SimPO target margin (loss_type: simpo)
    precompute_ref_logps: bool = False  # score every pair with the reference once up front, then free it
    scheduler: str = "none"        # which pairs of each batch to train on: none (all) | random | sams
    keep_ratio: float = 0.5        # share of each batch kept by the random or SamS scheduler
    sams: SamsSettings = field(default_factory=SamsSettings)  # SamS settings (scheduler: sams)
    pairs: str = "data"            # data: the task's / sources' preference pairs | own: sampled from `model`
                                   # and scored by the task's checker (own: settings; prompts from data)
    own: OwnPairs = field(default_factory=OwnPairs)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-7))

    def __post_init__(self):
        one_of(self.loss_type, "loss_type", ("sigmoid", "ipo", "simpo"))
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        one_of(self.scheduler, "scheduler", ("none", "random", "sams"))
        check(0 < self.keep_ratio <= 1, "keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")
        check(self.simpo_gamma >= 0, "simpo_gamma", f"must be >= 0, got {self.simpo_gamma}")
        one_of(self.pairs, "pairs", ("data", "own"))
        check(self.pairs == "data" or self.data.budget is None, "pairs",
               "own samples its pairs from prompts; data.budget splits constructed pairs (use pairs: data)")


@dataclass(frozen=True)
class PPOConfig:
    model: str = DEFAULT_MODEL          # policy init (and reference, unless ref_model is set)
    ref_model: str | None = None        # KL reference; None: the policy's init
    reward_model: str | None = None     # RM checkpoint (stage rm); None: rule/gold rewards only
    critic_model: str | None = None     # value model init; None: the reward model (or the policy if no RM)
    output_dir: str = "runs/ppo"
    estimator: str = "gae"              # gae (PPO with a critic) | grpo | rloo (group baselines, no critic)
    engine: str = "hf"                  # rollout engine: hf (our decode loop on transformers) | vllm
    num_engines: int = 1                # rollout actors
    weight_sync: str = "object_store"   # object_store (any engine) | collective (vllm; NCCL on GPUs: weight_sync.py)
    sync_check_every: int = 5           # full engine-vs-trainer log-prob check after every k-th sync; between,
                                        # the rollouts' own log-probs are checked against the trainer's (free)
    num_reward_workers: int = 1         # reward-model actors
    colocate: bool = False              # all roles share the same devices (take turns) | each role its own
    prompts_per_iter: int = 8           # prompts per PPO iteration
    samples_per_prompt: int = 2         # n responses per prompt
    share_prompts: bool = True          # policy and reference forward each prompt once for its n samples
                                        # (core/shared_prefix.py; same log-probs and gradients); false: every
                                        # sample's prompt in its own row
    iterations: int = 10                # PPO iterations (rollout + update)
    max_new_tokens: int = 64            # response length cap
    temperature: float = 1.0            # sampling temperature (also applied to the trainer's logits)
    top_p: float = 1.0                  # nucleus sampling
    ppo_epochs: int = 2                 # passes over each rollout batch
    minibatch_size: int = 8             # sequences per PPO minibatch (per policy worker)
    clip_eps: float = 0.2               # policy ratio clip
    value_clip_eps: float = 0.2         # value clip
    critic_lr: float = 1e-5             # critic AdamW lr (the policy's is train.lr)
    gamma: float = 1.0                  # GAE discount
    lam: float = 0.95                   # GAE lambda
    kl_coef: float = 0.05               # initial per-token KL penalty coefficient
    kl_estimator: str = "k1"            # k1 | k2 | k3
    kl_in: str = "reward"               # reward: -kl_coef*KL in the reward (Ziegler et al.) | loss: kl_coef*KL
                                        # added to the policy loss (GRPO; TRL's beta), k3 the usual estimator there
    kl_target: float | None = None      # adaptive KL controller target (None: fixed coefficient)
    kl_horizon: int = 10000             # adaptive controller horizon (samples)
    gold_reward_weight: float = 0.0     # add the task's checker reward (rule reward) with this weight
    rule_reward: str | None = None      # "module:function" (example, text, response_ids) -> float, added as is
    gold_rule: str | None = None        # "module:function" gold scorer for the watch (default: the task's checker)
    missing_eos_penalty: float = 0.0    # subtracted from responses that hit max_new_tokens without EOS
    whiten_advantages: bool = True      # normalise advantages over the batch
    hacking_window: int = 4             # iterations the reward-hacking watch compares (later vs earlier half)
    hacking_z: float = 2.0              # standard errors the proxy must rise and the gold fall for a verdict
    stop_on_hacking: bool = False       # stop when proxy rises while gold falls; keep the best-gold checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-6))

    def __post_init__(self):
        one_of(self.estimator, "estimator", ("gae", "grpo", "rloo"))
        one_of(self.engine, "engine", ("hf", "vllm"))
        one_of(self.weight_sync, "weight_sync", ("object_store", "collective"))
        check(self.weight_sync == "object_store" or self.engine == "vllm", "weight_sync",
               "collective weight sync needs engine: vllm (it runs through vLLM's worker extension)")
        one_of(self.kl_estimator, "kl_estimator", ("k1", "k2", "k3"))
        one_of(self.kl_in, "kl_in", ("reward", "loss"))
        for key in ("num_engines", "num_reward_workers", "prompts_per_iter", "samples_per_prompt", "iterations",
                    "max_new_tokens", "ppo_epochs", "minibatch_size", "kl_horizon", "hacking_window",
                    "sync_check_every"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.estimator == "gae" or self.samples_per_prompt >= 2, "samples_per_prompt",
               f"{self.estimator} needs >= 2 samples per prompt (a group baseline)")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(0 < self.clip_eps < 1, "clip_eps", f"must be in (0, 1), got {self.clip_eps}")
        check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma in (0, 1] and lam in [0, 1]")
        check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        # the adaptive controller divides by the target: 0 would end the first iteration in a ZeroDivisionError
        check(self.kl_target is None or self.kl_target > 0, "kl_target", f"must be > 0 or null, got {self.kl_target}")
        check(0 < self.critic_lr < 1, "critic_lr", f"must be in (0, 1), got {self.critic_lr}")
        check(self.value_clip_eps > 0, "value_clip_eps", f"must be > 0, got {self.value_clip_eps}")
        for key in ("gold_reward_weight", "missing_eos_penalty"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        check(self.hacking_z > 0, "hacking_z", f"must be > 0, got {self.hacking_z}")


STAGES = ("sft", "rm", "ppo", "dpo")  # the chain's order


@dataclass(frozen=True)
class PipelineConfig:
    """The chained run. Each stage section is that stage's config; the pipeline fills in what chains them
    (unless the section sets it): the RM starts from the SFT model, PPO's policy from the previous policy
    with the RM as reward model and critic, DPO from the previous policy; every ``output_dir`` is
    ``<run_dir>/<stage>``. The report's held-out set: ``held_out_sections``."""

    run_dir: str = "runs/pipeline"          # manifest, checkpoints and report of the chained run
    model: str = DEFAULT_MODEL              # the first stage's input model
    stages: tuple[str, ...] = STAGES        # which stages to run, in this order (any subset)
    report: bool = True                     # evaluate every stage's model at the end, write report.md + plots
    eval_size: int = 32                     # held-out examples in the report
    eval_max_new_tokens: int = 128          # greedy answer length in the report
    eval_dtype: str = "float32"             # the report's greedy answers: float32 | bfloat16 | auto (bfloat16 on
                                            # a device with native bf16: a GPU, a CPU with AVX512-BF16 or AMX);
                                            # KL, RM and implicit-reward scores stay float32
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self):
        check(len(self.stages) > 0, "stages", "must name at least one stage")
        for s in self.stages:
            one_of(s, "stages", STAGES)
        check(len(set(self.stages)) == len(self.stages), "stages", f"names a stage twice: {list(self.stages)}")
        check(list(self.stages) == sorted(self.stages, key=STAGES.index), "stages",
               f"must keep the order {' -> '.join(STAGES)}, got {list(self.stages)}")
        check(self.eval_size >= 1, "eval_size", f"must be >= 1, got {self.eval_size}")
        check(self.eval_max_new_tokens >= 1, "eval_max_new_tokens", f"must be >= 1, got {self.eval_max_new_tokens}")
        one_of(self.eval_dtype, "eval_dtype", ("float32", "bfloat16", "auto"))
        # The report scores the first eval_size held-out examples of these sections' data splits; asking for
        # more than a section holds out would score examples that stage trained on.
        for section in filter(None, self.held_out_sections()):
            held = getattr(self, section).data.eval_size
            check(self.eval_size <= held, "eval_size", f"{self.eval_size} is more than the {held} examples "
                   f"{section}.data holds out of training (raise {section}.data.eval_size)")

    def held_out_sections(self) -> tuple[str, str | None]:
        """(section whose held-out examples the report and a Tune trial answer, section whose held-out pairs
        they score): the sft data when SFT runs, else the first stage's; pairs from dpo (else rm) when one of
        them runs. data/held_out.py reads the sets."""
        examples = "sft" if "sft" in self.stages else self.stages[0]
        pairs = "dpo" if "dpo" in self.stages else "rm" if "rm" in self.stages else None
        return examples, pairs
