"""The ingress's view of the pools: cached pool views and a task locator.

Placement reads the views (orch/api/pools.py ``PoolView``), refreshed at most every ``ttl_s``
seconds (one call per pool per refresh, shared by every request in between). A request never
waits for that refresh while the views are younger than ``STALE_LIMIT_S``: it places on them
and the refresh runs beside it (this replica's own admissions are already counted in them,
see ``note_admitted``); views older than that, or marked stale after a pool was lost, are
refreshed first. Operator reads (``rows()``) always wait for views at most ``ttl_s`` old.
A pool's detail (chat template, special tokens) is fetched again only when its view's
``model_version`` moved on; metrics are asked for when /metrics is scraped. Where a task
lives is asked of the pools themselves when this replica did not admit it, so any ingress
replica can stream or cancel any task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Callable, Optional

import ray

from orch.api.pools import PoolDetail, PoolView
from orch.config import OrchConfig
from orch.core.prefix import merged
from orch.pools.supervisor import ACTOR_NAME as SUPERVISOR_ACTOR
from orch.serve.demand import DemandClient
from orch.serve.pool_client import PoolClient, PoolLost, PoolNotRunning

log = logging.getLogger("orch.ingress")

#: Seconds between two reminders to the supervisor to keep reconciling.
SUPERVISOR_NUDGE_S = 5.0
#: Age (seconds) up to which placement uses the cached views while they refresh beside it.
STALE_LIMIT_S = 2.0
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
        self.pools = PoolClient(config.namespace, handles, config.server.stream_interval_ms / 1000)
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
        #: Called with the new views after each refresh (the status page's queue-depth chart).
        self.listeners: list[Callable[[dict[str, PoolView]], None]] = []
        #: Prompt hashes this replica sent to each pool since the refresh in flight began
        #: (a snapshot taken before the pool admitted them would not list them yet).
        self._sent: dict[str, list[tuple[float, bytes]]] = {}
        #: Tasks counted into a cached row by ``note_admitted``, not yet finished.
        self._counted: OrderedDict[str, None] = OrderedDict()
        #: The model set's pools, which exist while their model is loaded (None: no model set).
        self.demand = DemandClient(config) if config.model_set is not None and nudge_supervisor else None

    # -- snapshot ------------------------------------------------------------------------
    async def rows(self, fresh: bool = True) -> dict[str, PoolView]:
        """Every configured pool's view, by id, at most ``ttl_s`` old; ``fresh=False`` (the
        request path): views up to ``STALE_LIMIT_S`` old, refreshed beside the caller."""
        age = time.monotonic() - self._taken_at
        if age > self.ttl_s:
            if fresh or age > max(self.ttl_s, STALE_LIMIT_S):
                await self.refresh()
            elif self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.ensure_future(self._refresh())
        return self._rows

    async def views(self) -> list[PoolView]:
        """The same views as a list (placement's input), without waiting while they are
        younger than ``STALE_LIMIT_S``."""
        await self.rows(fresh=False)
        return self._views

    def age_s(self) -> float:
        """Seconds since the views were taken."""
        return time.monotonic() - self._taken_at

    def invalidate(self) -> None:
        """The views are wrong (a pool's actor was lost): the next read waits for new ones."""
        self._taken_at = -math.inf

    def model_detail(self, pool_id: str) -> Optional[PoolDetail]:
        """The pool's detail as of its current model (None until it answered once)."""
        return self._model_details.get(pool_id)

    async def details(self) -> dict[str, PoolDetail]:
        """Every reachable pool's detail, asked now (metrics, counters, binding)."""
        pool_ids = self.pool_ids()
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
        pool_ids = self.pool_ids()
        began = time.monotonic()
        if self.demand is not None:
            await self.demand.state()
            pool_ids = self.pool_ids()
        results = await asyncio.gather(*(self.pools.view(pid) for pid in pool_ids), return_exceptions=True)
        rows: dict[str, PoolView] = {}
        for pool_id, result in zip(pool_ids, results):
            if isinstance(result, BaseException):
                rows[pool_id] = self._unreachable_row(pool_id, result)
            else:
                rows[pool_id] = result
                if result.last_error:
                    self._causes[pool_id] = result.last_error
                elif result.ready:  # recovered: an old cause would mislead the next outage's row
                    self._causes.pop(pool_id, None)
        await self._follow_models(rows)
        self._keep_sent(rows, began)
        self._set_rows(rows)
        self._taken_at = time.monotonic()
        self._announce(rows)
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

    def _announce(self, rows: dict[str, PoolView]) -> None:
        for listener in self.listeners:
            try:
                listener(rows)
            except Exception:  # a chart must never break placement
                log.exception("registry listener failed")

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

    def pool_ids(self) -> list[str]:
        """The configured pools, then the model set's pools that exist now."""
        ids = [pool.id for pool in self.config.pools]
        return ids + self.demand.pool_ids() if self.demand is not None else ids

    async def ensure_model(self, name: Optional[str], wait: bool = False) -> None:
        """A model of the set that no pool serves yet is loaded first (see orch/serve/demand.py);
        anything else returns at once."""
        if self.demand is not None and await self.demand.ensure(name, await self.views(), wait):
            self.invalidate()

    def _unreachable_row(self, pool_id: str, exc: BaseException) -> PoolView:
        pool = self.demand.pool_config(pool_id) if self.demand is not None and pool_id in self.demand.pool_ids() \
            else self.config.pool(pool_id)
        return PoolView(
            pool_id=pool_id,
            replica_set=pool.replica_set or pool_id,
            engine=pool.engine.value,
            model_ref=pool.model,
            model_aliases=tuple(pool.model_aliases),
            ready=False,
            slots=pool.slots,
            reserve_slots=pool.reserve_slots,
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

    def note_admitted(self, pool_id: str, prefix: bytes = b"", task_id: Optional[str] = None) -> None:
        """Count a task this replica just placed into its cached row, so decisions made
        before the next refresh spread over equal pools instead of piling onto one; its
        prompt's packed block hashes (``prefix``) join the row's cached prefixes likewise.
        With ``task_id``, ``note_finished`` takes it out again when its stream ends."""
        row = self._rows.get(pool_id)
        if row is not None:
            if task_id is not None:
                self._counted[task_id] = None
                while len(self._counted) > LOCATOR_CAPACITY:
                    self._counted.popitem(last=False)
            row = row.with_admitted()
            if prefix:
                row = replace(row, prefix_hashes=merged(prefix, row.prefix_hashes))
                self._sent.setdefault(pool_id, []).append((time.monotonic(), prefix))
            self._set_rows(dict(self._rows, **{pool_id: row}))

    def note_finished(self, task_id: str, pool_id: str) -> None:
        """A task counted by ``note_admitted`` ended: its pool has one task less than the
        cached row says (a row refreshed since never counted it twice: rows are replaced
        whole, and only the current one is corrected), so the next turn of a conversation
        does not see its own previous turn as load."""
        if task_id not in self._counted:
            return
        del self._counted[task_id]
        row = self._rows.get(pool_id)
        if row is None:
            return
        if row.queue_depth > 0:
            row = replace(row, queue_depth=row.queue_depth - 1)
        else:
            row = replace(row, active_slots=max(0, row.active_slots - 1))
        self._set_rows(dict(self._rows, **{pool_id: row}))

    def _keep_sent(self, rows: dict[str, PoolView], began: float) -> None:
        """Hashes sent after this refresh began may be missing from its snapshots: keep them."""
        for pool_id, sent in list(self._sent.items()):
            sent = [(at, packed) for at, packed in sent if at >= began]
            row = rows.get(pool_id)
            if not sent or row is None or not row.ready:
                self._sent.pop(pool_id, None)
                continue
            self._sent[pool_id] = sent
            for _, packed in sent:
                row = replace(row, prefix_hashes=merged(packed, row.prefix_hashes))
            rows[pool_id] = row

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
        pool_ids = self.pool_ids()
        answers = await asyncio.gather(*(self.pools.has_task(pid, task_id) for pid in pool_ids),
                                       return_exceptions=True)
        for pid, answer in zip(pool_ids, answers):
            if answer is True:
                self.remember(task_id, pid)
                return pid
        return None
