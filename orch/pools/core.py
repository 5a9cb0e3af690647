"""What every part of one pool shares: its config, engine, queue, tasks and lifecycle,
and the few moves they all make (end a task with an error, end the queued tasks, give up
on a failed engine). Plain asyncio, no Ray."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from orch.api.errors import ErrorCode
from orch.api.pool_state import PoolState
from orch.api.pools import CatalogBinding, TaskEvent, TaskMarks
from orch.api.tasks import TaskRequest
from orch.config import PoolConfig
from orch.core.admission import ModelLimits
from orch.core.capacity import GpuMemory
from orch.core.forecast import RateTracker
from orch.core.prefix import PrefixCache, entries_for
from orch.core.queue import TaskQueue
from orch.engines.base import Engine, EngineError
from orch.observability.pool_metrics import PoolMetrics
from orch.pools import results
from orch.pools.counts import PoolCounts
from orch.pools.state import Lifecycle
from orch.pools.task_record import TaskRecord

log = logging.getLogger("orch.pool")

#: How long a queued task's client should wait before resubmitting a task the pool ended.
RETRY_AFTER_MS = 1000


class PoolCore:
    def __init__(self, config: PoolConfig, engine_factory: Callable[..., Engine]) -> None:
        self.config = config
        self.pool_id = config.id
        self.engine_factory = engine_factory
        self._engine: Optional[Engine] = None
        #: Moves on with every engine change (see ``PoolView.model_version``).
        self.model_version = 0
        self.queue: TaskQueue[TaskRecord] = TaskQueue(config.queue.capacity, config.queue.policy)
        self.tasks: dict[str, TaskRecord] = {}
        self.life = Lifecycle()
        #: An operator's drain, or a failed engine's: admits nothing, runs what it has.
        self.draining = False
        self.drain_deadline_at: Optional[float] = None
        self.last_error: Optional[str] = None
        self.supervision_note: Optional[str] = None
        self.model_ref = config.model
        self.model_aliases: tuple[str, ...] = tuple(config.model_aliases)
        self.model_digest: Optional[str] = None
        #: What the catalog says this pool loads (orch/catalog/binding.py); None: its own ref.
        self.binding: Optional[CatalogBinding] = None
        #: The binding the loaded engine was built from (None: the configured ref itself).
        self.loaded_key: Optional[str] = None
        #: The preparation plan while the pool waits for its model (orch/api/preparation.py).
        self.preparation: Optional[dict[str, Any]] = None
        #: Tasks queued before the model was loaded, whose exact checks run once it is.
        self.deferred: dict[str, TaskRequest] = {}
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.executor = ThreadPoolExecutor(max_workers=config.engine_slots + 1, thread_name_prefix=f"pool-{config.id}")
        #: Set when there may be work for an idle slot.
        self.work = asyncio.Event()
        #: Set when a reserve slot may have work: a task queued, or a tenant's last task ended.
        self.reserve_work = asyncio.Event()
        #: Cleared while the engine is swapped: slots take no new task.
        self.dispatch_open = asyncio.Event()
        self.dispatch_open.set()
        self.active_slots = 0
        self.free_slots: list[int] = list(range(config.slots))
        #: The tenants' reserve (see ``PoolConfig.tenant_reserve_slots``): engine slots after
        #: the regular ones, each taken only by a tenant with nothing running here.
        self.free_reserve: list[int] = list(range(config.slots, config.engine_slots))
        #: Tasks running per tenant.
        self.running_tenants: Counter[str] = Counter()
        #: The task each busy slot runs (the watchdog's view of the slots).
        self.running: dict[int, TaskRecord] = {}
        self.service_ms = 1000.0  # moving average of a task's run time
        #: The prompts the engine probably holds, as block hashes (prefix-aware placement).
        self.prefix = PrefixCache(0)
        self.metrics = PoolMetrics()
        self.counts = PoolCounts(self.metrics)
        #: Measured first-token time and decode rate, for the on-time forecast.
        self.rates = RateTracker()
        #: The GPUs Ray granted this pool (their ids, comma-separated); set by the actor.
        self.device_mask: Optional[str] = None
        self.gpu_memory = GpuMemory(config.num_gpus, config.gpu_memory_bytes)

    @property
    def engine(self) -> Optional[Engine]:
        return self._engine

    @engine.setter
    def engine(self, engine: Optional[Engine]) -> None:
        """Every load, swap and unload goes through here, so the ingress learns from the view's
        ``model_version`` when to fetch the chat template again."""
        if engine is not self._engine:
            self.model_version += 1
            self.prefix.reset(*prefix_source(engine, self.engine_name, self.config))
        self._engine = engine

    @property
    def engine_name(self) -> str:
        return self.config.engine.value

    def limits(self) -> ModelLimits:
        return ModelLimits(ctx_max=self.engine.ctx_max if self.engine else 0, max_tokens_out=self.config.max_tokens_out)

    @staticmethod
    def decode_ms(record: TaskRecord) -> int:
        if record.started_at is None:
            return 0
        return int((time.monotonic() - record.started_at) * 1000)

    def per_slot_ms(self) -> float:
        return self.service_ms / self.config.slots

    def error_payload(self, code: ErrorCode, message: str, *, retriable: bool = False,
                      retry_after_ms: Optional[int] = None) -> dict[str, Any]:
        return results.error_payload(self.pool_id, self.engine_name, code, message, retriable=retriable,
                                     retry_after_ms=retry_after_ms)

    def fail(self, record: TaskRecord, code: ErrorCode, message: str, *, retriable: bool = False,
             retry_after_ms: Optional[int] = None) -> bool:
        """End a task with a typed error, counted as failed only when the error is what the
        task ended with (not when a cancel ended it first)."""
        pushed = record.push("error", self.error_payload(code, message, retriable=retriable,
                                                         retry_after_ms=retry_after_ms))
        if pushed:
            self.counts.add("failed")
        return pushed

    def end_tasks(self, code: ErrorCode, message: str, *, running_too: bool = False) -> int:
        """End every queued task (with ``running_too``, every unfinished one) with a retriable
        error: another pool, or this one later, may serve it. Returns how many it ended."""
        if running_too:
            victims = [record for record in self.tasks.values() if not record.terminal]
            for record in victims:
                self.queue.cancel(record.task_id)
        else:
            victims = []
            while (item := self.queue.pop()) is not None:
                victims.append(item[1])
        ended = 0
        for record in victims:
            record.cancelled = True
            ended += record.push("error", self.error_payload(code, message, retriable=True,
                                                             retry_after_ms=RETRY_AFTER_MS))
        return ended

    def engine_fault(self, exc: EngineError) -> None:
        """The engine itself failed: stop admitting, fail what is queued (retriable, so
        clients resubmit and placement picks a healthy pool), and let the supervisor restart us."""
        if self.life.state is PoolState.stopped:
            return
        self.life.to(PoolState.engine_failed)
        self.draining = True
        self.last_error = f"engine failed: {exc}"
        log.error("pool %s: %s", self.pool_id, self.last_error, extra={
            "pool_id": self.pool_id, "human": f"Pool {self.pool_id} lost its engine and stopped taking work."})
        ended = self.end_tasks(ErrorCode.WORKER_RESET,
                               f"pool '{self.pool_id}' lost its engine before this task ran; resubmit it")
        self.counts.add("failed", ended)

    def log_context(self, record: TaskRecord, human: str) -> dict[str, Any]:
        return {"task_id": record.task_id, "session_id": record.session_id, "pool_id": self.pool_id,
                "engine": self.engine_name, "correlation_id": record.correlation_id, "human": human}

    def wake(self) -> None:
        self.work.set()
        self.reserve_work.set()


def prefix_source(engine: Optional[Engine], name: str, config: PoolConfig) -> tuple[int, Any, int]:
    """What the pool's prefix report reads for ``engine``: prompts its cache holds about, its
    cache report (when it can tell), and the tokens its KV cache holds (0 unknown)."""
    if engine is None:
        return 0, None, 0
    return (entries_for(name, config.engine_slots, config.engine_options), getattr(engine, "cache_report", None),
            int(getattr(engine, "cache_capacity_tokens", 0) or 0))


def first_token_marks(record: TaskRecord, events: list[TaskEvent]) -> Optional[TaskMarks]:
    """The task's times in the pool when ``events`` (a page being sent) carries its first
    token, else None. Stops at the page's first token, so a page costs a look at the few
    frames before it."""
    if record.first_token_at is None:
        return None
    for _, kind, data in events:
        if kind == "token":
            if data.get("i") != 0:
                return None
            return TaskMarks(admitted_at=record.admitted_at, started_at=record.started_at,
                             first_token_at=record.first_token_at, sent_at=time.monotonic())
    return None
