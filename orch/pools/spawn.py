"""Creating and removing pool actors: Ray places each by its GPUs, CPUs and resources (a
pool spanning several GPUs gets a placement group). The supervisor and the orchestrator's
teardown both use these; nothing here knows the supervisor."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from orch.catalog.binding import runtime_env_key
from orch.config import OrchConfig, PoolConfig, to_wire
from orch.engines import pool_threads
from orch.engines.vllm_engine import placement_bundles
from orch.pools.actor import MAX_CONCURRENCY, PoolActor, actor_name

log = logging.getLogger("orch.pool")


def create_pool_actor(pool: PoolConfig, config: OrchConfig, runtime_env: Optional[dict[str, Any]] = None):
    """A new pool actor (not started): Ray places it by its GPUs, CPUs and resources;
    ``runtime_env`` is a handed-off engine's (a pip package, a container image)."""
    options: dict[str, Any] = dict(
        name=actor_name(pool.id),
        namespace=config.namespace,
        lifetime="detached",
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        max_concurrency=MAX_CONCURRENCY,
    )
    if pool.resources:
        options["resources"] = dict(pool.resources)
    bundles = gpu_bundles(pool)
    if bundles:
        # The actor takes its CPUs from bundle 0 and no GPU: the engine's own workers (vLLM's
        # Ray executor) are started as child actors in the group and take one GPU each.
        options["num_gpus"] = 0
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            _pool_group(pool.id, config.namespace, bundles), placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)
    elif pool.node_id:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=pool.node_id, soft=False)
    spec = to_wire(config)["pools"][[p.id for p in config.pools].index(pool.id)]
    env = dict(runtime_env or {})
    threads_env = engine_threads_env(pool)
    if threads_env:
        env["env_vars"] = threads_env | dict(env.get("env_vars") or {})
    if env:
        options["runtime_env"] = env
    return PoolActor.options(**options).remote(spec, config.namespace, config.artifacts.root,
                                               runtime_env_key(runtime_env) if runtime_env else None)


def engine_threads_env(pool: PoolConfig) -> dict[str, str]:
    """OpenMP's thread count in the pool's process. Ray sets ``OMP_NUM_THREADS`` from an
    actor's ``num_cpus`` (1 by default), and llama.cpp's and vLLM's CPU kernels run on
    OpenMP: with it at 1, a pool asked to decode on 2 threads measured ~30 % fewer tokens/s
    at 8 concurrent streams. The pool's ``threads`` (else its CPUs) sets it instead."""
    if pool.engine.value not in ("llamacpp", "vllm"):
        return {}
    return {"OMP_NUM_THREADS": str(pool_threads(pool))}


def gpu_bundles(pool: PoolConfig) -> Optional[list[dict[str, float]]]:
    """The placement group a pool spanning several GPUs runs in (vLLM with tensor or
    pipeline parallelism), or None for a pool that is one actor with its own resources."""
    if pool.engine.value != "vllm":
        return None
    return placement_bundles(pool.engine_options, pool.num_cpus)


def group_name(pool_id: str, namespace: str) -> str:
    return f"orch-pool-group:{namespace}:{pool_id}"


def _pool_group(pool_id: str, namespace: str, bundles: list[dict[str, float]]):
    """A fresh detached group for the pool (one left by a previous actor of it is removed:
    its actor is gone, and the group would only hold the GPUs)."""
    remove_pool_group(pool_id, namespace)
    return placement_group(bundles, strategy="PACK", name=group_name(pool_id, namespace), lifetime="detached")


def remove_pool_group(pool_id: str, namespace: str) -> bool:
    try:
        group = get_placement_group(group_name(pool_id, namespace))
    except ValueError:
        return False
    remove_placement_group(group)
    return True


def remove_pool_actors(config: OrchConfig) -> list[str]:
    """Stop and remove every configured pool actor, and their placement groups (they are
    detached: deleting the Serve application alone leaves them holding their GPUs)."""
    removed = []
    for pool in config.pools:
        try:
            handle = ray.get_actor(actor_name(pool.id), namespace=config.namespace)
        except ValueError:
            continue
        try:
            ray.get(handle.shutdown.remote(), timeout=10)
        except Exception as exc:  # a wedged pool is killed regardless
            log.warning("pool %s: clean shutdown failed (%s); killing it", pool.id, exc)
        ray.kill(handle, no_restart=True)
        _wait_gone(actor_name(pool.id), config.namespace)
        removed.append(pool.id)
    for pool in config.pools:
        if gpu_bundles(pool):
            remove_pool_group(pool.id, config.namespace)
    return removed


def _wait_gone(name: str, namespace: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)
