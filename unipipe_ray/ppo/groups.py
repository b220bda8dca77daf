"""PPO's Ray actor groups: placed by one placement group, and the policy's weights synced into the rollout
engines after every update (object store, or a collective over a weight group: weight_sync.py).
"""

from __future__ import annotations

from unipipe_ray.config import PPOConfig


def build_groups(cfg: PPOConfig, paths: dict, pad_id: int, threads: int) -> tuple[dict, object]:
    """The actor groups, placed by one placement group: ``colocate`` puts actor i of every role on bundle i
    (the roles take turns on the same devices), otherwise every actor gets a bundle of its own. On CPU the
    counts are fractional scheduling tokens: the phases run one after another on the same cores. Returns
    ({role: ActorGroup}, the placement group, to remove when the run ends)."""
    import ray

    from unipipe_ray.ppo.roles import CriticTrainer, PolicyTrainer, ReferenceModel, RewardScorer
    from unipipe_ray.ppo.rollout import RolloutWorker
    from unipipe_ray.runtime.actors import ActorGroup, placement_bundles

    workers = cfg.train.num_workers
    roles = {"engines": (RolloutWorker, cfg.num_engines), "policy": (PolicyTrainer, workers),
             "reference": (ReferenceModel, 1)}
    if paths.get("reward"):
        roles["reward"] = (RewardScorer, cfg.num_reward_workers)
    if cfg.estimator == "gae":
        roles["critic"] = (CriticTrainer, workers)
    share = len(roles) if cfg.colocate else 1  # actors sharing one bundle split its device
    gpu = 1 / share if cfg.train.use_gpu else 0
    cpu = 1 / share if cfg.train.use_gpu else 0.1
    pg, bundles = placement_bundles({name: n for name, (_, n) in roles.items()}, cpu * share, gpu * share,
                                    cfg.colocate)
    ray.get(pg.ready(), timeout=600)
    steps = cfg.iterations * cfg.ppo_epochs * max(1, cfg.prompts_per_iter * cfg.samples_per_prompt
                                                  // (cfg.minibatch_size * workers))
    # Every role runs on the device Ray assigns its actor (roles.py) in the configured dtype.
    engine_kwargs = {"dtype": cfg.train.dtype, "seed": cfg.train.seed, "threads": threads}
    if cfg.engine == "vllm" and gpu:
        # vLLM reserves this share of the GPU's memory: the fraction of the GPU this engine was given
        # (with headroom), not its default 0.9, which colocated roles would not leave it.
        engine_kwargs |= {"memory_fraction": round(0.9 * gpu, 3), "sleep_between": cfg.colocate}
    trainer = {"max_grad_norm": cfg.train.max_grad_norm, "total_updates": steps, "seed": cfg.train.seed,
               "threads": threads, "pad_id": pad_id, "dtype": cfg.train.dtype}
    kwargs = {
        "engines": {"kind": cfg.engine, "model_path": paths["policy"], **engine_kwargs},
        "policy": {"model_path": paths["policy"], "lr": cfg.train.lr, "temperature": cfg.temperature,
                   "clip_eps": cfg.clip_eps, "backend": cfg.train.backend, "zero_stage": cfg.train.zero_stage,
                   "share_prompts": cfg.share_prompts, **trainer},
        "reference": {"model_path": paths["reference"], "pad_id": pad_id, "temperature": cfg.temperature,
                      "threads": threads, "dtype": cfg.train.dtype, "share_prompts": cfg.share_prompts},
        "reward": {"model_path": paths.get("reward"), "pad_id": pad_id, "threads": threads, "seed": cfg.train.seed,
                   "dtype": cfg.train.dtype},
        "critic": {"model_path": paths["critic"], "lr": cfg.critic_lr, "clip_eps": cfg.value_clip_eps, **trainer},
    }
    groups = {name: ActorGroup(cls, n, kwargs[name], num_cpus=cpu, num_gpus=gpu, placement=pg,
                               bundles=bundles[name], distributed=name in ("policy", "critic"),
                               max_restarts=3 if name == "engines" else 0, env_vars={"OMP_NUM_THREADS": str(threads)})
              for name, (cls, n) in roles.items()}
    return groups, pg


def join_weight_group(groups: dict) -> list:
    """Trainer rank 0 and every engine join one weight group (collective sync); returns the weight specs.
    Rank 0 hosts the group, so it meets at rank 0's node (not the driver's, another node on a cluster)."""
    import ray

    host, port = ray.get(groups["policy"].actors[0].meeting_point.remote())
    world = 1 + len(groups["engines"])
    ray.get([groups["policy"].actors[0].join_weight_group.remote(host, port, world)]
            + [e.join_weight_group.remote(host, port, 1 + i, world) for i, e in enumerate(groups["engines"].actors)])
    return groups["policy"].actors[0].weight_specs.remote()


def sync_weights(groups: dict, specs=None):
    """The policy's new weights into every rollout engine: rank 0's full state dict through the object store,
    or (``specs`` given: weight_sync collective) a broadcast over the weight group. Returns the object-store
    state (None after a collective sync) for re-syncing a restarted engine.

    The object-store path hands the engines the reference to what rank 0 returned, so the state dict goes
    from the trainer's node to the engines' without a stop at the driver (on SmolLM2-135M, 2-core CPU: 1.7 s,
    against about 7 s when the driver fetched it and put it back)."""
    import ray

    if specs is not None:
        ray.get([a.send_weights.remote() for a in groups["policy"].actors]
                + [e.receive_weights.remote(specs) for e in groups["engines"].actors])
        return None
    policy = groups["policy"].actors
    refs = [a.state_dict.remote() for a in policy]  # every rank gathers (a collective under ZeRO-3)
    ray.wait(refs[:1], fetch_local=False)
    # The other ranks return None, and a cheap call on rank 0 raises here if it died while gathering: a
    # dead trainer is the group's failure (the run rebuilds), not the engines' load.
    ray.get(refs[1:] + [policy[0].device_name.remote()])
    groups["engines"].call("load_weights", refs[0])
    return refs[0]
