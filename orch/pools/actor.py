"""Ray shell around PoolManager: one named, detached actor per pool.

The actor asks Ray for the pool's ``num_gpus`` / ``num_cpus``. It is async with a high
concurrency limit so long polls from many streams never block submit or cancel.
"""

from __future__ import annotations

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


def config_digest(config: PoolConfig, artifacts_root: str = "") -> str:
    spec = {"pool": config.model_dump(mode="json"), "artifacts_root": artifacts_root}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@ray.remote
class PoolActor:
    def __init__(self, config: dict[str, Any], namespace: str, artifacts_root: str) -> None:
        from orch.pools.manager import PoolManager

        logging.basicConfig(level=logging.INFO)
        self.config = PoolConfig.model_validate(config)
        self.namespace = namespace
        self.digest = config_digest(self.config, artifacts_root)
        self.manager = PoolManager(self.config)
        self._artifacts_root = artifacts_root
        self._artifacts = None
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

    def config_digest(self) -> str:
        return self.digest

    async def start(self) -> dict[str, Any]:
        return await self.manager.start()

    async def snapshot(self) -> dict[str, Any]:
        return self.manager.snapshot()

    async def submit(self, request: TaskRequest, task_id: str, correlation_id: Optional[str] = None) -> dict[str, Any]:
        return await self.manager.submit(request, task_id, correlation_id)

    async def poll(self, task_id: str, cursor: int, wait_s: float) -> dict[str, Any]:
        return await self.manager.poll(task_id, cursor, wait_s)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return await self.manager.cancel(task_id)

    async def has_task(self, task_id: str) -> bool:
        return self.manager.has_task(task_id)

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
    """Get or create every configured pool actor and start it (idempotent).

    A pool actor left by an earlier deployment with another configuration is replaced.
    """
    check_gpu_capacity(config, ray.cluster_resources().get("GPU", 0))
    handles = {}
    for pool in config.pools:
        handle = _get_or_create(pool, config.namespace, config.artifacts.root)
        handle.start.remote()
        handles[pool.id] = handle
    return handles


def _get_or_create(pool: PoolConfig, namespace: str, artifacts_root: str):
    options = dict(
        name=actor_name(pool.id),
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        max_concurrency=MAX_CONCURRENCY,
    )
    spec = pool.model_dump(mode="json")
    handle = PoolActor.options(**options).remote(spec, namespace, artifacts_root)
    if ray.get(handle.config_digest.remote()) != config_digest(pool, artifacts_root):
        log.warning("pool %s: configuration changed; replacing its actor", pool.id)
        ray.kill(handle, no_restart=True)
        _wait_gone(actor_name(pool.id), namespace)
        handle = PoolActor.options(**options).remote(spec, namespace, artifacts_root)
    return handle


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
    """Stop and remove every configured pool actor (they are detached, so deleting the
    Serve application alone leaves them holding their GPUs). Returns the pools removed."""
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
    return removed


def pool_handle(pool_id: str, namespace: str):
    return ray.get_actor(actor_name(pool_id), namespace=namespace)
