"""The ingress's view of the pools: cached pool views and a task locator.

Placement reads the views (orch/api/pools.py ``PoolView``), refreshed at most every ``ttl_s``
seconds (one call per pool per refresh, shared by every request in between), so a decision
is made on data at most ``ttl_s`` old plus one refresh. A pool's detail (chat template,
special tokens) is fetched again only when its view's ``model_version`` moved on; metrics are
asked for when /metrics is scraped. Where a task lives is asked of the pools themselves when
this replica did not admit it, so any ingress replica can stream or cancel any task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from typing import Any, Optional

import ray

from orch.api.pools import PoolDetail, PoolView
from orch.config import OrchConfig
from orch.pools.supervisor import ACTOR_NAME as SUPERVISOR_ACTOR
from orch.serve.pool_client import PoolClient, PoolLost, PoolNotRunning

log = logging.getLogger("orch.ingress")

#: Seconds between two reminders to the supervisor to keep reconciling.
SUPERVISOR_NUDGE_S = 5.0
#: Task -> pool entries remembered by one replica.
LOCATOR_CAPACITY = 100_000


class PoolRegistry:
    def __init__(self, config: OrchConfig, handles: dict[str, Any], ttl_s: float, *,
                 nudge_supervisor: bool = True) -> None:
        """``handles``: pool actors already known (the rest are looked up by name).
        ``nudge_supervisor=False`` for a registry over pools without Ray (benchmarks in
        process): looking the supervisor up would start a Ray instance."""
        self.config = config
        self.nudge_supervisor = nudge_supervisor
        self.pools = PoolClient(config.namespace, handles)
        self.ttl_s = ttl_s
        self._rows: dict[str, PoolView] = {}
        self._views: list[PoolView] = []
        self._taken_at = -math.inf
        self._refreshing: Optional[asyncio.Task] = None
        self._locations: OrderedDict[str, str] = OrderedDict()
        self._nudged_at = 0.0
        #: Each pool's detail as of its view's ``model_version`` (chat template, special tokens).
        self._model_details: dict[str, PoolDetail] = {}
        #: Each pool's last reported error, shown while its actor cannot be reached.
        self._causes: dict[str, str] = {}

    # -- snapshot ------------------------------------------------------------------------
    async def rows(self) -> dict[str, PoolView]:
        """Every configured pool's view, by id, at most ``ttl_s`` old."""
        if time.monotonic() - self._taken_at > self.ttl_s:
            await self.refresh()
        return self._rows

    async def views(self) -> list[PoolView]:
        """The same views as a list (placement's input)."""
        await self.rows()
        return self._views

    def model_detail(self, pool_id: str) -> Optional[PoolDetail]:
        """The pool's detail as of its current model (None until it answered once)."""
        return self._model_details.get(pool_id)

    async def details(self) -> dict[str, PoolDetail]:
        """Every reachable pool's detail, asked now (metrics, counters, binding)."""
        pool_ids = [pool.id for pool in self.config.pools]
        found = await asyncio.gather(*(self.pools.detail(pid) for pid in pool_ids), return_exceptions=True)
        return {pid: detail for pid, detail in zip(pool_ids, found) if isinstance(detail, PoolDetail)}

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
        results = await asyncio.gather(*(self.pools.view(pid) for pid in pool_ids), return_exceptions=True)
        rows: dict[str, PoolView] = {}
        for pool_id, result in zip(pool_ids, results):
            if isinstance(result, BaseException):
                rows[pool_id] = self._unreachable_row(pool_id, result)
            else:
                rows[pool_id] = result
                if result.last_error:
                    self._causes[pool_id] = result.last_error
        await self._follow_models(rows)
        self._set_rows(rows)
        self._taken_at = time.monotonic()
        self._nudge_supervisor()

    async def _follow_models(self, rows: dict[str, PoolView]) -> None:
        """Fetch the detail of the pools whose model changed since it was last fetched (once
        per load or swap, not per refresh)."""
        stale = [pid for pid, row in rows.items() if row.live and (
            pid not in self._model_details or self._model_details[pid].model_version != row.model_version)]
        if not stale:
            return
        found = await asyncio.gather(*(self.pools.detail(pid) for pid in stale), return_exceptions=True)
        for pool_id, detail in zip(stale, found):
            if isinstance(detail, PoolDetail):
                self._model_details[pool_id] = detail

    def _set_rows(self, rows: dict[str, PoolView]) -> None:
        self._rows = rows
        self._views = list(rows.values())

    def _nudge_supervisor(self) -> None:
        """Keep the supervisor's loop running, even after Ray restarted the supervisor
        itself (its loop starts on request, not in its constructor)."""
        now = time.monotonic()
        if not self.nudge_supervisor or now - self._nudged_at < SUPERVISOR_NUDGE_S:
            return
        self._nudged_at = now
        namespace = self.config.namespace

        def nudge() -> None:
            try:
                ray.get_actor(SUPERVISOR_ACTOR, namespace=namespace).run.remote()
            except Exception:  # not there (yet): the next ingress start creates it
                pass

        asyncio.get_running_loop().run_in_executor(None, nudge)

    def _unreachable_row(self, pool_id: str, exc: BaseException) -> PoolView:
        pool = self.config.pool(pool_id)
        return PoolView(
            pool_id=pool_id,
            replica_set=pool.replica_set or pool_id,
            engine=pool.engine.value,
            model_ref=pool.model,
            model_aliases=tuple(pool.model_aliases),
            ready=False,
            slots=pool.slots,
            vram_free_bytes=None,
            vram_total_bytes=None,
            live=False,
            last_error=self._unreachable_cause(pool_id, exc),
        )

    def _unreachable_cause(self, pool_id: str, exc: BaseException) -> str:
        said = f"pool actor unreachable: {exc.cause if isinstance(exc, PoolLost) else type(exc).__name__}"
        if isinstance(exc, PoolNotRunning):
            said = "pool actor not running (the supervisor starts or restarts it)"
        cause = self._causes.get(pool_id)
        return f"{said}; last error: {cause}" if cause else said

    def handle(self, pool_id: str):
        return self.pools.handle(pool_id)

    def forget(self, pool_id: str) -> None:
        """Drop a handle that failed: the supervisor may have replaced the actor."""
        self.pools.forget(pool_id)

    def note_admitted(self, pool_id: str) -> None:
        """Count a task this replica just queued into its cached row, so decisions made
        before the next refresh spread over equal pools instead of piling onto one."""
        row = self._rows.get(pool_id)
        if row is not None:
            self._set_rows(dict(self._rows, **{pool_id: row.with_admitted()}))

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
        answers = await asyncio.gather(*(self.pools.has_task(pid, task_id) for pid in pool_ids),
                                       return_exceptions=True)
        for pid, answer in zip(pool_ids, answers):
            if answer is True:
                self.remember(task_id, pid)
                return pid
        return None
