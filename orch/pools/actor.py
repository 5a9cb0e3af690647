"""Ray shell around PoolManager: one named, detached actor per pool.

The actor asks Ray for the pool's ``num_gpus`` / ``num_cpus``. It is async with a high
concurrency limit so long polls from many streams never block submit or cancel.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any, Optional

import ray

from orch.api.tasks import TaskRequest
from orch.config import OrchConfig, PoolConfig, check_gpu_capacity

log = logging.getLogger("orch.pool")

ACTOR_PREFIX = "orch-pool:"
MAX_CONCURRENCY = 10_000


def actor_name(pool_id: str) -> str:
    return ACTOR_PREFIX + pool_id


def config_digest(pool: PoolConfig, config: OrchConfig) -> str:
    """What a pool actor was built from; a different digest means it must be replaced."""
    return _digest(pool, config.artifacts.root)


def _digest(pool: PoolConfig, artifacts_root: str) -> str:
    spec = {"pool": pool.model_dump(mode="json"), "artifacts_root": artifacts_root}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@ray.remote
class PoolActor:
    def __init__(self, config: dict[str, Any], namespace: str, artifacts_root: str,
                 runtime_env_key: Optional[str] = None) -> None:
        from orch.pools.manager import PoolManager

        from orch.observability.logs import configure_logging

        configure_logging()
        self.config = PoolConfig.model_validate(config)
        self.namespace = namespace
        self.digest = _digest(self.config, artifacts_root)
        #: The runtime_env this actor was started with (a handed-off package or container).
        self.runtime_env_key = runtime_env_key
        self.node_id = ray.get_runtime_context().get_node_id()
        self.manager = PoolManager(self.config)
        granted = ray.get_gpu_ids()
        self.manager.device_mask = ",".join(str(gpu) for gpu in granted) if granted else None
        self._artifacts_root = artifacts_root
        self._ray_metrics = None
        self._ray_metrics_task: Optional[asyncio.Task] = None
        self._artifacts = None
        self._sessions = None
        self.manager.finish_listeners.append(self._charge_session)
        self.manager.finish_listeners.append(self._store_transcript)

    async def _store_transcript(self, summary: dict[str, Any]) -> None:
        from orch.artifacts.actor import artifact_actor

        if self._artifacts is None:
            self._artifacts = artifact_actor(self._artifacts_root, self.namespace)
        try:
            await self._artifacts.put.remote(summary["transcript"])
        except ray.exceptions.RayActorError:
            self._artifacts = None  # it was restarted: find it again next time
            raise

    async def _charge_session(self, summary: dict[str, Any]) -> None:
        """Report a finished task's usage (however it ended) to its session: ids and counts only.

        The sessions actor is found by name, so sessions config never touches the pools: a
        task only has a live session after an ingress created that actor.
        """
        from orch.sessions.actor import find_sessions_actor

        session_id = summary.get("session_id")
        if not session_id:
            return
        if self._sessions is None:
            self._sessions = await asyncio.to_thread(find_sessions_actor, self.namespace)
            if self._sessions is None:
                return
        try:
            await self._sessions.record_usage.remote(
                session_id, summary["tokens_in"], summary["tokens_out"], summary["decode_time_ms"])
        except ray.exceptions.RayActorError:
            self._sessions = None  # it was restarted (its sessions with it): find it again next time
            raise

    def config_digest(self) -> str:
        return self.digest

    async def start(self, binding: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        snap = await self.manager.start(binding)
        self._export_to_ray()
        return self._with_placement(snap)

    def _export_to_ray(self) -> None:
        """Replay the pool's key series into ray.util.metrics (Ray's metrics export and
        dashboard; see deployments/grafana-llama-orch.json), from the first start on."""
        if self._ray_metrics is not None:
            return
        from orch.observability.ray_metrics import RayMetricsExporter

        try:
            self._ray_metrics = RayMetricsExporter(self.manager.snapshot)
        except Exception:  # metrics must never keep a pool from serving
            log.exception("pool %s: Ray metrics export is off", self.config.id)
            return
        self._ray_metrics_task = asyncio.get_running_loop().create_task(self._ray_metrics.run())

    async def ray_metrics_status(self, export_now: bool = False) -> Optional[dict[str, Any]]:
        """What this pool has exported to Ray's metrics (None when the export is off)."""
        if self._ray_metrics is None:
            return None
        if export_now:
            self._ray_metrics.export_once()
        return self._ray_metrics.status()

    async def snapshot(self) -> dict[str, Any]:
        return self._with_placement(self.manager.snapshot())

    def _with_placement(self, snap: dict[str, Any]) -> dict[str, Any]:
        snap["node_id"] = self.node_id
        snap["runtime_env_key"] = self.runtime_env_key
        return snap

    async def bind(self, binding: dict[str, Any]) -> dict[str, Any]:
        """The catalog's new binding for this pool (see orch/catalog/binding.py)."""
        return self._with_placement(await self.manager.bind(binding))

    async def set_preparation(self, prep: Optional[dict[str, Any]]) -> None:
        self.manager.set_preparation(prep)

    async def submit(self, request: TaskRequest, task_id: str, correlation_id: Optional[str] = None,
                     context: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return await self.manager.submit(request, task_id, correlation_id, context)

    async def poll(self, task_id: str, cursor: int, wait_s: float) -> dict[str, Any]:
        return await self.manager.poll(task_id, cursor, wait_s)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return await self.manager.cancel(task_id)

    async def has_task(self, task_id: str) -> bool:
        return self.manager.has_task(task_id)

    async def recent_tasks(self, limit: int) -> list[dict[str, Any]]:
        return self.manager.recent_tasks(limit)

    async def set_supervision_note(self, note: Optional[str]) -> None:
        self.manager.set_supervision_note(note)

    async def health(self) -> dict[str, Any]:
        return self.manager.health()

    async def drain(self, deadline_ms: Optional[int]) -> dict[str, Any]:
        return await self.manager.drain(deadline_ms)

    async def undrain(self) -> None:
        await self.manager.undrain()

    async def reload(self, new_model_ref: str) -> dict[str, Any]:
        return await self.manager.reload(new_model_ref)

    async def purge(self) -> dict[str, Any]:
        return await self.manager.purge()

    async def shutdown(self) -> None:
        await self.manager.stop()


def ensure_pools(config: OrchConfig) -> dict[str, "ray.actor.ActorHandle"]:
    """Hand the configuration to the supervisor, which creates, starts and watches every
    pool (idempotent: every ingress replica calls it on start). Returns the pool handles
    that exist already; the registry finds the others by name as they appear."""
    from orch.pools.supervisor import ensure_supervisor

    check_gpu_capacity(config, ray.cluster_resources().get("GPU", 0))
    ensure_supervisor(config)
    handles = {}
    for pool in config.pools:
        try:
            handles[pool.id] = pool_handle(pool.id, config.namespace)
        except ValueError:
            continue
    return handles


def create_pool_actor(pool: PoolConfig, config: OrchConfig, runtime_env: Optional[dict[str, Any]] = None):
    """A new pool actor (not started): Ray places it by its GPUs, CPUs and resources;
    ``runtime_env`` is a handed-off engine's (a pip package, a container image)."""
    from orch.config import to_wire

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
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # The actor takes its CPUs from bundle 0 and no GPU: the engine's own workers (vLLM's
        # Ray executor) are started as child actors in the group and take one GPU each.
        options["num_gpus"] = 0
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            _pool_group(pool.id, config.namespace, bundles), placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)
    elif pool.node_id:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=pool.node_id, soft=False)
    spec = to_wire(config)["pools"][[p.id for p in config.pools].index(pool.id)]
    if runtime_env:
        options["runtime_env"] = dict(runtime_env)
    from orch.catalog.binding import runtime_env_key

    return PoolActor.options(**options).remote(spec, config.namespace, config.artifacts.root,
                                               runtime_env_key(runtime_env) if runtime_env else None)


def gpu_bundles(pool: PoolConfig) -> Optional[list[dict[str, float]]]:
    """The placement group a pool spanning several GPUs runs in (vLLM with tensor or
    pipeline parallelism), or None for a pool that is one actor with its own resources."""
    if pool.engine.value != "vllm":
        return None
    from orch.engines.vllm_engine import placement_bundles

    return placement_bundles(pool.engine_options, pool.num_cpus)


def group_name(pool_id: str, namespace: str) -> str:
    return f"orch-pool-group:{namespace}:{pool_id}"


def _pool_group(pool_id: str, namespace: str, bundles: list[dict[str, float]]):
    """A fresh detached group for the pool (one left by a previous actor of it is removed:
    its actor is gone, and the group would only hold the GPUs)."""
    from ray.util.placement_group import placement_group

    remove_pool_group(pool_id, namespace)
    return placement_group(bundles, strategy="PACK", name=group_name(pool_id, namespace), lifetime="detached")


def remove_pool_group(pool_id: str, namespace: str) -> bool:
    from ray.util.placement_group import get_placement_group, remove_placement_group

    try:
        group = get_placement_group(group_name(pool_id, namespace))
    except ValueError:
        return False
    remove_placement_group(group)
    return True


def _wait_gone(name: str, namespace: str, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)


def shutdown_pools(config: OrchConfig) -> list[str]:
    """Stop the supervisor, then stop and remove every configured pool actor (they are
    detached, so deleting the Serve application alone leaves them holding their GPUs)."""
    from orch.pools.supervisor import stop_supervisor

    stop_supervisor(config.namespace)
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


def pool_handle(pool_id: str, namespace: str):
    return ray.get_actor(actor_name(pool_id), namespace=namespace)
