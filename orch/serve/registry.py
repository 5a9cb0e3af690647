"""The ingress's view of the pools: a cached snapshot and a task locator.

Placement reads the snapshot, which is refreshed at most every ``ttl_s`` seconds (one call
per pool per refresh, shared by every request in between), so a decision is made on data
at most ``ttl_s`` old plus one refresh. Where a task lives is asked of the pools themselves
when this replica did not admit it, so any ingress replica can stream or cancel any task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Optional

import ray

from orch.api.errors import ErrorCode
from orch.config import OrchConfig
from orch.core.errors import OrchError
from orch.core.placement import PoolView
from orch.pools.actor import pool_handle

log = logging.getLogger("orch.ingress")

#: Seconds between two reminders to the supervisor to keep reconciling.
SUPERVISOR_NUDGE_S = 5.0
#: Task -> pool entries remembered by one replica.
LOCATOR_CAPACITY = 100_000


class PoolRegistry:
    def __init__(self, config: OrchConfig, handles: dict[str, Any], ttl_s: float) -> None:
        self.config = config
        self.handles = dict(handles)
        self.ttl_s = ttl_s
        self._rows: dict[str, dict[str, Any]] = {}
        self._taken_at = 0.0
        self._refreshing: Optional[asyncio.Task] = None
        self._locations: OrderedDict[str, str] = OrderedDict()
        self._nudged_at = 0.0
        self._views: Optional[list[PoolView]] = None
        #: Each pool's last reported error, shown while its actor cannot be reached.
        self._causes: dict[str, str] = {}

    # -- snapshot ------------------------------------------------------------------------
    async def rows(self) -> dict[str, dict[str, Any]]:
        if time.monotonic() - self._taken_at > self.ttl_s:
            await self.refresh()
        return self._rows

    async def refresh(self, force: bool = False) -> None:
        """Single-flight: concurrent callers share one round of snapshot calls. ``force``
        waits for a round that starts now (after an operator changed a pool)."""
        if force and self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        pool_ids = [pool.id for pool in self.config.pools]
        results = await asyncio.gather(*(self._snapshot_of(pid) for pid in pool_ids), return_exceptions=True)
        rows = {}
        for pool_id, result in zip(pool_ids, results):
            if isinstance(result, BaseException):
                rows[pool_id] = self._unreachable_row(pool_id, result)
            else:
                rows[pool_id] = result
                if result.get("last_error"):
                    self._causes[pool_id] = result["last_error"]
        self._rows = rows
        self._views = None
        self._taken_at = time.monotonic()
        self._nudge_supervisor()

    def _nudge_supervisor(self) -> None:
        """Keep the supervisor's loop running, even after Ray restarted the supervisor
        itself (its loop starts on request, not in its constructor)."""
        now = time.monotonic()
        if now - self._nudged_at < SUPERVISOR_NUDGE_S:
            return
        self._nudged_at = now
        from orch.pools.supervisor import ACTOR_NAME

        namespace = self.config.namespace

        def nudge() -> None:
            try:
                ray.get_actor(ACTOR_NAME, namespace=namespace).run.remote()
            except Exception:  # not there (yet): the next ingress start creates it
                pass

        asyncio.get_running_loop().run_in_executor(None, nudge)

    async def _snapshot_of(self, pool_id: str) -> dict[str, Any]:
        """The pool's snapshot; a cached handle to an actor that was replaced (the supervisor
        restarted the pool) is looked up again by name once before the pool counts as lost."""
        for attempt in range(2):
            handle = self.handles.get(pool_id)
            if handle is None:
                handle = await asyncio.to_thread(pool_handle, pool_id, self.config.namespace)
                self.handles[pool_id] = handle
            try:
                return await handle.snapshot.remote()
            except ray.exceptions.RayActorError:
                self.handles.pop(pool_id, None)
                if attempt:
                    raise
        return {}  # not reached: the second attempt returns or raises

    def _unreachable_row(self, pool_id: str, exc: BaseException) -> dict[str, Any]:
        pool = self.config.pool(pool_id)
        return {
            "pool_id": pool_id,
            "replica_set": pool.replica_set or pool_id,
            "engine": pool.engine.value,
            "engine_version": "",
            "model_ref": pool.model,
            "model_aliases": tuple(pool.model_aliases),
            "ready": False,
            "draining": False,
            "slots": pool.slots,
            "active_slots": 0,
            "queue_depth": 0,
            "last_error": self._unreachable_cause(pool_id, exc),
        }

    def _unreachable_cause(self, pool_id: str, exc: BaseException) -> str:
        said = f"pool actor unreachable: {type(exc).__name__}"
        if isinstance(exc, ValueError):  # no actor of that name (yet)
            said = "pool actor not running (the supervisor starts or restarts it)"
        cause = self._causes.get(pool_id)
        return f"{said}; last error: {cause}" if cause else said

    async def views(self) -> list[PoolView]:
        """The snapshot as placement views, built once per refresh (or local admission)."""
        rows = await self.rows()
        if self._views is None:
            self._views = self._build_views(rows)
        return self._views

    def _build_views(self, rows: dict[str, dict[str, Any]]) -> list[PoolView]:
        return [
            PoolView(
                pool_id=row["pool_id"],
                engine=row["engine"],
                model_ref=row["model_ref"],
                model_aliases=tuple(row.get("model_aliases", ())),
                ready=row["ready"],
                draining=row.get("draining", False),
                vram_free_bytes=row.get("vram_free_bytes", 0),
                vram_total_bytes=row.get("vram_total_bytes", 0),
                slots=row.get("slots", 1),
                active_slots=row.get("active_slots", 0),
                queue_depth=row.get("queue_depth", 0),
                device_mask=row.get("device_mask"),
                workloads=tuple(row.get("workloads", ("completion",))),
                replica_set=row.get("replica_set"),
                engine_version=row.get("engine_version", ""),
                service_ms=row.get("service_ms", 0.0),
            )
            for row in rows.values()
        ]

    def handle(self, pool_id: str):
        handle = self.handles.get(pool_id)
        if handle is None:
            try:
                handle = pool_handle(pool_id, self.config.namespace)
            except ValueError:
                raise OrchError(ErrorCode.POOL_UNAVAILABLE,
                                f"pool '{pool_id}' is being (re)started by its supervisor; retry shortly",
                                retriable=True, retry_after_ms=1000, pool_id=pool_id) from None
            self.handles[pool_id] = handle
        return handle

    def forget(self, pool_id: str) -> None:
        """Drop a handle that failed: the supervisor may have replaced the actor."""
        self.handles.pop(pool_id, None)

    def note_admitted(self, pool_id: str) -> None:
        """Count a task this replica just queued into its cached row, so decisions made
        before the next refresh spread over equal pools instead of piling onto one."""
        row = self._rows.get(pool_id)
        if row is not None:
            self._rows = dict(self._rows)
            self._rows[pool_id] = dict(row, queue_depth=row.get("queue_depth", 0) + 1)
            self._views = None

    # -- task locator --------------------------------------------------------------------
    def remember(self, task_id: str, pool_id: str) -> None:
        self._locations[task_id] = pool_id
        self._locations.move_to_end(task_id)
        while len(self._locations) > LOCATOR_CAPACITY:
            self._locations.popitem(last=False)

    async def locate(self, task_id: str) -> Optional[str]:
        pool_id = self._locations.get(task_id)
        if pool_id is not None:
            return pool_id
        pool_ids = [pool.id for pool in self.config.pools]
        async def ask(pid: str):
            return await self.handle(pid).has_task.remote(task_id)

        answers = await asyncio.gather(*(ask(pid) for pid in pool_ids), return_exceptions=True)
        for pid, answer in zip(pool_ids, answers):
            if answer is True:
                self.remember(task_id, pid)
                return pid
        return None
