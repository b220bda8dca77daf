"""One wrapper that turns a plain class into a group of Ray actors: the only place ``ray.remote`` is applied.

    group = ActorGroup(PolicyTrainer, 2, kwargs, placement=pg_bundles, distributed=True)
    group.call("logps", samples)            same arguments to every actor -> list of results
    group.call_split("score", samples)      items split evenly across actors -> concatenated results

``distributed=True`` gives each actor ``rank``, ``world`` and a shared ``master`` (a Meeting) so the group
forms its own torch process group, hosted by rank 0 on its own node: rank 0 picks its node's IP and a port
free there, the others wait for it (the driver's address would be wrong on a cluster, where rank 0 runs on
another node). Calls wait on every actor at once. A group with ``max_restarts`` (rollout engines) retries
on the restarted actor after ``on_restart(actor)`` (e.g. to push current weights); a group without raises
RoleDied at the first death, whatever the other ranks are doing, so the caller can rebuild.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Meeting:
    """Where a group's rank 0 listens: rank 0 sets it, the other ranks wait for it (a 0-CPU actor)."""

    def __init__(self):
        self.address: tuple[str, int] | None = None

    def set(self, address: tuple[str, int]) -> None:
        self.address = address

    def get(self) -> tuple[str, int] | None:
        return self.address


def meet(meeting, rank: int, timeout_s: float = 600.0) -> tuple[str, int]:
    """Rank 0: publish (this node's IP, a port free on it) and return it; other ranks: wait for rank 0's."""
    import ray

    from unipipe_ray.runtime.distributed import free_port

    if rank == 0:
        address = (ray.util.get_node_ip_address(), free_port())
        ray.get(meeting.set.remote(address))
        return address
    deadline = time.monotonic() + timeout_s
    while (address := ray.get(meeting.get.remote())) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 did not publish its address within {timeout_s:.0f} s")
        time.sleep(0.1)
    return tuple(address)


def placement_bundles(groups: dict[str, int], cpus_per_actor: float, gpus_per_actor: float, colocate: bool):
    """One placement group for the PPO roles. colocate=True: every role's actor i shares bundle i (roles take
    turns on the same devices); False: every actor gets its own bundle (roles run side by side)."""
    from ray.util.placement_group import placement_group

    size = max(groups.values()) if colocate else sum(groups.values())
    bundle = {"CPU": cpus_per_actor} | ({"GPU": gpus_per_actor} if gpus_per_actor else {})
    pg = placement_group([dict(bundle) for _ in range(size)], strategy="PACK")
    offsets, start = {}, 0
    for name, n in groups.items():
        offsets[name] = list(range(n)) if colocate else list(range(start, start + n))
        start += 0 if colocate else n
    return pg, offsets


class RoleDied(RuntimeError):
    """An actor of a group Ray does not restart died (a PPO trainer, critic, reference or reward actor): its
    process group is broken, so the caller rebuilds every group from the last checkpoint."""


class ActorGroup:
    def __init__(self, cls, n: int, kwargs: dict, *, num_cpus: float = 1, num_gpus: float = 0, placement=None,
                 bundles: list[int] | None = None, distributed: bool = False, max_restarts: int = 0,
                 env_vars: dict | None = None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = ray.remote(cls)
        self.meeting = ray.remote(num_cpus=0)(Meeting).remote() if distributed and n > 1 else None
        master = self.meeting
        self.actors, self.name, self.max_restarts = [], cls.__name__, max_restarts
        for rank in range(n):
            options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": max_restarts,
                       "runtime_env": {"env_vars": env_vars or {}}}
            if placement is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement, placement_group_bundle_index=bundles[rank])
            extra = {"rank": rank, "world": n, "master": master} if distributed else {}
            self.actors.append(remote.options(**options).remote(**kwargs, **extra))

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args, on_restart=None, **kwargs) -> list:
        """Call ``method`` on every actor with the same arguments; wait for all."""
        return self._gather(method, [(args, kwargs)] * len(self.actors), on_restart)

    def call_split(self, method: str, items: list, *args, on_restart=None, **kwargs) -> list:
        """Split ``items`` into contiguous shards, one per actor, and concatenate the per-actor results."""
        shards = split(items, len(self.actors))
        results = self._gather(method, [((shard, *args), kwargs) for shard in shards], on_restart)
        return [x for part in results for x in part]

    def call_each(self, method: str, per_actor_args: list[tuple], on_restart=None) -> list:
        """Call ``method`` on actor i with ``per_actor_args[i]`` (e.g. each trainer's own shard)."""
        return self._gather(method, [(args, {}) for args in per_actor_args], on_restart)

    def _gather(self, method: str, calls: list[tuple[tuple, dict]], on_restart) -> list:
        """Results in actor order, waiting on all at once: a death is seen as soon as it happens, even while
        another rank blocks in a collective with the dead one (waiting in order would sit there until the
        process-group timeout)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        refs = {getattr(a, method).remote(*args, **kw): i
                for i, (a, (args, kw)) in enumerate(zip(self.actors, calls, strict=True))}
        out: list = [None] * len(self.actors)
        while refs:
            (ready,), _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ready)
            try:
                out[i] = ray.get(ready)
            except (RayActorError, ActorUnavailableError) as e:
                if not self.max_restarts:
                    raise RoleDied(f"{self.name} actor {i} of {len(self.actors)} died during {method}") from e
                log.warning("%s actor %d died during %s; retrying on the restarted actor", self.name, i, method)
                out[i] = self._retry(self.actors[i], method, *calls[i], on_restart)
        return out

    def _retry(self, actor, method, args, kwargs, on_restart, wait_s: float = 120.0):
        import ray
        from ray.exceptions import ActorUnavailableError

        # Ray restarts the actor (max_restarts); until it is up, calls fail as "unavailable". Once it answers,
        # bring it up to date (on_restart, e.g. push the current weights) and retry the call.
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if on_restart is not None:
                    on_restart(actor)
                return ray.get(getattr(actor, method).remote(*args, **kwargs))
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def kill(self) -> None:
        import ray

        for a in self.actors + ([self.meeting] if self.meeting is not None else []):
            ray.kill(a, no_restart=True)


def split(items: list, n: int) -> list[list]:
    """Contiguous shards whose sizes differ by at most one (order kept, so results concatenate back)."""
    size, extra = divmod(len(items), n)
    shards, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards
