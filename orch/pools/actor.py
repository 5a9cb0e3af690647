"""Ray shell around PoolManager: one named, detached actor per pool.

The actor asks Ray for the pool's ``num_gpus`` / ``num_cpus``. It is async with a high
concurrency limit so long polls from many streams never block submit or cancel. Creating,
finding and removing pool actors is orch/pools/spawn.py's job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any, Optional

import ray

from orch.actors import ActorClient
from orch.api.pools import (
    CancelResult,
    CatalogBinding,
    PollResult,
    PoolDetail,
    PoolSnapshot,
    PoolView,
    SubmitResult,
    TaskContext,
)
from orch.api.tasks import TaskRequest
from orch.artifacts.actor import artifact_actor
from orch.config import OrchConfig, PoolConfig
from orch.core.prefix import salt_for
from orch.observability.logs import configure_logging
from orch.observability.ray_metrics import RayMetricsExporter
from orch.pools.manager import PoolManager
from orch.pools.priority import above_normal_niceness, set_niceness
from orch.sessions.actor import find_sessions_actor
from orch.tenants.limiter import find_limiter

log = logging.getLogger("orch.pool")

ACTOR_PREFIX = "orch-pool:"
MAX_CONCURRENCY = 10_000


def actor_name(pool_id: str) -> str:
    return ACTOR_PREFIX + pool_id


def pool_handle(pool_id: str, namespace: str):
    return ray.get_actor(actor_name(pool_id), namespace=namespace)


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
        configure_logging()
        self.config = PoolConfig.model_validate(config)
        self.namespace = namespace
        self.digest = _digest(self.config, artifacts_root)
        #: The runtime_env this actor was started with (a handed-off package or container).
        self.runtime_env_key = runtime_env_key
        self.node_id = ray.get_runtime_context().get_node_id()
        self.manager = PoolManager(self.config)
        self.manager.core.prefix.salt = salt_for(namespace)  # hashes its engine's cache as the ingress hashes prompts
        self.manager.node_id, self.manager.runtime_env_key = self.node_id, runtime_env_key
        granted = ray.get_gpu_ids()
        self.manager.device_mask = ",".join(str(gpu) for gpu in granted) if granted else None
        self._ray_metrics: Optional[RayMetricsExporter] = None
        self._ray_metrics_task: Optional[asyncio.Task] = None
        # Both are found by name; one that was restarted is found again once per call.
        self._artifacts = ActorClient(lambda: artifact_actor(artifacts_root, namespace))
        self._sessions = ActorClient(lambda: find_sessions_actor(namespace))
        self._limiter = ActorClient(lambda: find_limiter(namespace))
        self.manager.finish_listeners.append(self._charge_session)
        self.manager.finish_listeners.append(self._settle_limits)
        self.manager.finish_listeners.append(self._store_transcript)
        self._priority_warned = False
        self._prioritize()

    def _prioritize(self) -> None:
        """Every thread of this process at the pool's niceness (orch/pools/priority.py);
        called again once the engine loaded, for the threads it started meanwhile."""
        if self.config.niceness is None:
            if not self._priority_warned and (said := above_normal_niceness()):
                self._priority_warned = True
                log.info("pool %s: %s", self.config.id, said, extra={"pool_id": self.config.id})
            return
        refused = set_niceness(self.config.niceness)
        if refused and not self._priority_warned:
            self._priority_warned = True
            log.warning("pool %s: %s", self.config.id, refused, extra={"pool_id": self.config.id})

    async def _store_transcript(self, summary: dict[str, Any]) -> None:
        await self._artifacts.call("put", summary["transcript"])

    async def _charge_session(self, summary: dict[str, Any]) -> None:
        """Report a finished task's usage (however it ended) to its session: ids and counts only.

        The sessions actor is found by name, so sessions config never touches the pools: a
        task only has a live session after an ingress created that actor.
        """
        if not summary.get("session_id") or await self._sessions.get() is None:
            return
        await self._sessions.call("record_usage", summary["session_id"], summary["tokens_in"],
                                  summary["tokens_out"], summary["decode_time_ms"])

    async def _settle_limits(self, summary: dict[str, Any]) -> None:
        """Settle a limited task's reservation with its real usage, however it ended."""
        if not summary.get("key_id") or await self._limiter.get() is None:
            return
        await self._limiter.call("settle", summary["task_id"], summary["tokens_in"], summary["tokens_out"])

    def config_digest(self) -> str:
        return self.digest

    async def start(self, binding: Optional[CatalogBinding] = None) -> PoolView:
        view = await self.manager.start(binding)
        self._prioritize()
        self._export_to_ray()
        return view

    def _export_to_ray(self) -> None:
        """Replay the pool's key series into ray.util.metrics (Ray's metrics export and
        dashboard; see deployments/grafana-llama-orch.json), from the first start on."""
        if self._ray_metrics is not None:
            return
        try:
            self._ray_metrics = RayMetricsExporter(self.manager.report)
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

    async def snapshot(self) -> PoolView:
        """What placement reads (every ingress replica, every ``snapshot_ttl_s``)."""
        return self.manager.snapshot()

    async def detail(self) -> PoolDetail:
        return self.manager.detail()

    async def report(self) -> PoolSnapshot:
        """View and detail together: the supervisor's round and an operator's health check."""
        return self.manager.report()

    async def bind(self, binding: CatalogBinding) -> PoolView:
        """The catalog's new binding for this pool (see orch/catalog/binding.py)."""
        return await self.manager.bind(binding)

    async def set_preparation(self, prep: Optional[dict[str, Any]]) -> None:
        self.manager.set_preparation(prep)

    async def submit(self, request: TaskRequest, task_id: str, correlation_id: Optional[str] = None,
                     context: Optional[TaskContext] = None) -> SubmitResult:
        return await self.manager.submit(request, task_id, correlation_id, context)

    async def poll(self, task_id: str, cursor: int, wait_s: float, until_done: bool = False) -> PollResult:
        return await self.manager.poll(task_id, cursor, wait_s, until_done)

    async def poll_many(self, requests: list[tuple[str, int]], wait_s: float) -> list[PollResult]:
        return await self.manager.poll_many(requests, wait_s)

    async def cancel(self, task_id: str) -> CancelResult:
        return await self.manager.cancel(task_id)

    async def has_task(self, task_id: str) -> bool:
        return self.manager.has_task(task_id)

    async def recent_tasks(self, limit: int) -> list[dict[str, Any]]:
        return self.manager.recent_tasks(limit)

    async def set_supervision_note(self, note: Optional[str]) -> None:
        self.manager.set_supervision_note(note)

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
