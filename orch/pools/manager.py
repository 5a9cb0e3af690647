"""A pool: one engine, its bounded queue, its slots and its tasks' event buffers.

Plain asyncio, no Ray: ``orch.pools.actor`` hosts one of these per Ray actor. PoolManager
is the pool's face (the methods the actor and tests call) and its lifecycle (start, stop);
the work is done by small parts that share one PoolCore (orch/pools/core.py):

- admission.py: the checks, the queue, the predictions given back (start time, backoff);
- worker.py: the slots that run tasks on the engine (on the loop, or in a thread per slot);
- frames.py: the ``metrics`` frames and the sentences that say the same in words;
- watchdog.py: deadlines, stalled engines, stuck slots;
- preparation.py and swap.py: the catalog's binding, the preparation plan, and the one
  swap path that both an operator's reload and a new binding take;
- control.py: drain, undrain, purge; finish.py: transcripts and finish listeners;
- snapshot.py: what the pool says about itself; state.py: its lifecycle states.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import Any, Callable, Optional, Sequence, Union

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.api.pool_state import PoolState
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
from orch.api.preparation import PrepStatus, PrepStep
from orch.api.tasks import EmbeddingRequest, TaskRequest
from orch.catalog import binding as bindings
from orch.config import PoolConfig, project_root
from orch.core.capacity import CapacityError, available_memory, check_fits
from orch.engines import build_engine
from orch.engines.base import Engine, EngineError
from orch.pools import results, snapshot as snapshots
from orch.pools.admission import Admission
from orch.pools.control import Control
from orch.pools.core import PoolCore, first_token_marks
from orch.pools.finish import Finisher, FinishListener
from orch.pools.frames import Frames
from orch.pools.preparation import Preparation
from orch.pools.swap import RELOAD_IDLE_TIMEOUT_S, ModelSwap, new_engine
from orch.pools.task_record import TaskRecord, changed_any
from orch.pools.watchdog import Watchdog
from orch.pools.worker import Slots

log = logging.getLogger("orch.pool")

#: How long cancel waits for stream consumers to acknowledge what they were handed.
CANCEL_ACK_TIMEOUT_S = 2.0

__all__ = ["PoolManager", "FinishListener"]


def _shared(name: str, doc: str = "") -> property:
    """An attribute of the pool's shared core, read (and set) through the manager."""
    return property(lambda self: getattr(self.core, name), lambda self, value: setattr(self.core, name, value),
                    doc=doc or None)


class PoolManager:
    config = _shared("config")
    pool_id = _shared("pool_id")
    engine = _shared("engine")
    queue = _shared("queue")
    tasks = _shared("tasks")
    draining = _shared("draining")
    drain_deadline_at = _shared("drain_deadline_at")
    last_error = _shared("last_error")
    supervision_note = _shared("supervision_note")
    model_ref = _shared("model_ref")
    model_aliases = _shared("model_aliases")
    model_digest = _shared("model_digest")
    binding = _shared("binding")
    preparation = _shared("preparation")
    active_slots = _shared("active_slots")
    metrics = _shared("metrics")
    rates = _shared("rates")
    device_mask = _shared("device_mask", "The GPUs Ray granted this pool (their ids, comma-separated); set by the actor.")
    gpu_memory = _shared("gpu_memory")
    _free_slots = _shared("free_slots")

    def __init__(self, config: PoolConfig, engine_factory: Callable[..., Engine] = build_engine) -> None:
        self.core = core = PoolCore(config, engine_factory)
        self.frames = Frames(core)
        self.finisher = Finisher(core, self.frames)
        self.admission = Admission(core, self.frames.push, self.finisher.finalize)
        self.slots = Slots(core, self.frames)
        self.watchdog = Watchdog(core, self.frames)
        self.prep = Preparation(core, self.frames)
        self.swap = ModelSwap(core, self.prep, self.start)
        self.control = Control(core)
        self._started_lock = asyncio.Lock()
        self._workers: list[asyncio.Task] = []
        self._watchdog: Optional[asyncio.Task] = None
        #: Where the actor runs and the runtime env it was started with (set by the actor).
        self.node_id: Optional[str] = None
        self.runtime_env_key: Optional[str] = None

    # -- what the lifecycle says ---------------------------------------------------------
    @property
    def state(self) -> PoolState:
        return self.core.life.state

    @property
    def ready(self) -> bool:
        return self.core.life.ready

    @property
    def loading(self) -> bool:
        return self.core.life.loading

    @property
    def engine_failed(self) -> bool:
        return self.core.life.engine_failed

    @property
    def held(self) -> Optional[str]:
        """Why the pool holds instead of loading: bindings.WAITING or RETIRED; None: it does not."""
        return self.core.life.held

    @property
    def counters(self) -> dict[str, int]:
        return self.core.counts.to_dict()

    @property
    def finish_listeners(self) -> list[FinishListener]:
        return self.finisher.listeners

    @property
    def _finished(self) -> Optional[asyncio.Queue]:
        return self.finisher.finished

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, binding: Optional[CatalogBinding] = None, *, unhold: bool = False) -> PoolView:
        """Preload the model, then start the slot workers; Ready only after both. With a
        ``binding`` that says the model is not present (waiting, retired), hold instead;
        ``unhold``: load whatever held the pool before (an operator named a new model)."""
        core = self.core
        async with self._started_lock:
            if core.life.ready or self._workers:
                return self.snapshot()
            core.loop = asyncio.get_running_loop()
            self.finisher.start()
            if binding is None and core.binding is None:  # the catalog's word has not come yet
                unbound = bindings.resolve(self.pool_id, core.engine_name, core.model_ref, [], [], project_root(),
                                           attached_url=core.config.engine_options.get("base_url"))
                binding = unbound if unbound.status == bindings.WAITING else None
            if binding is not None:
                holds = self.prep.take_binding(binding)
            else:
                holds = core.life.held is not None and not unhold
            if holds:
                return self.snapshot()
            engine = await self._load()
            if engine is not None:
                self._serve(engine)
            return self.snapshot()

    async def _load(self) -> Optional[Engine]:
        """The first load of the pool's model; None when it failed (the cause in last_error)."""
        core = self.core
        core.life.to(PoolState.loading)
        self.prep.step(PrepStep.pool_warmup, PrepStatus.running, 0, "loading the model")
        try:
            engine = new_engine(core, core.binding)
            check_fits(self.pool_id, engine.memory_needed(),
                       available_memory(core.config.num_gpus, core.config.gpu_memory_bytes))
            await core.loop.run_in_executor(core.executor, engine.load)
        except (EngineError, CapacityError, OSError, ValueError) as exc:
            self._load_failed(f"preload failed: {exc}")
            return None
        except Exception as exc:  # an engine bug must still leave a cause, never a silent hang
            log.exception("pool %s: preload failed", self.pool_id)
            self._load_failed(f"preload failed: {type(exc).__name__}: {exc}")
            return None
        if core.life.state is PoolState.stopped:  # stopped while it loaded
            engine.close()
            return None
        return engine

    def _load_failed(self, cause: str) -> None:
        core = self.core
        core.last_error = cause
        if core.life.state is not PoolState.stopped:
            core.life.to(PoolState.load_failed)
        log.error("pool %s: %s", self.pool_id, cause)
        self.prep.step(PrepStep.pool_warmup, PrepStatus.failed, 0, cause)

    def _serve(self, engine: Engine) -> None:
        """The model is loaded: run the deferred tasks' checks, start the slots, go Ready."""
        core = self.core
        core.engine = engine
        core.loaded_key = core.binding.load_key if core.binding is not None else None
        self.prep.done()
        core.life.to(PoolState.ready)
        self.admission.admit_deferred()
        self._workers = [asyncio.create_task(self.slots.worker()) for _ in range(core.config.slots)]
        self._workers += [asyncio.create_task(self.slots.reserve_worker()) for _ in range(core.config.reserve_slots)]
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self.watchdog.run())
        core.last_error = None
        core.wake()
        log.info("pool %s ready: %s %s, ctx %d", self.pool_id, engine.name, engine.version, engine.ctx_max)

    async def stop(self) -> None:
        core = self.core
        core.life.to(PoolState.stopped)
        for task in self._workers + ([self._watchdog] if self._watchdog is not None else []):
            task.cancel()
        self.finisher.stop()
        for record in list(core.tasks.values()):
            if not record.terminal:
                record.cancelled = True
                record.push("error", core.error_payload(ErrorCode.WORKER_RESET, "pool is shutting down",
                                                        retriable=True))
        core.executor.shutdown(wait=False, cancel_futures=True)
        if core.engine is not None:
            core.engine.close()

    # -- what the pool says about itself -------------------------------------------------
    def limits(self):
        return self.core.limits()

    def snapshot(self) -> PoolView:
        return snapshots.view(self.core, self.node_id, self.runtime_env_key)

    def detail(self) -> PoolDetail:
        return snapshots.detail(self.core)

    def report(self) -> PoolSnapshot:
        return snapshots.report(self.core, self.node_id, self.runtime_env_key)

    def workloads(self) -> tuple[str, ...]:
        return snapshots.workloads(self.core.engine)

    def has_task(self, task_id: str) -> bool:
        return task_id in self.core.tasks

    def recent_tasks(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest tasks, newest first, for an operator's status view: ids, state and
        progress only, never prompt text, so the answer is safe to show anyone who may
        see the pool."""
        now = time.monotonic()
        newest = heapq.nlargest(max(0, limit), self.core.tasks.values(), key=lambda record: record.admitted_at)
        positions = self._queue_positions({r.task_id for r in newest if r.state == "queued" and not r.terminal})
        return [{"task_id": record.task_id, "pool_id": self.pool_id, "state": _task_state(record),
                 "priority": record.priority, "tokens_out": record.tokens_out,
                 "queue_position": positions.get(record.task_id), "age_ms": int((now - record.admitted_at) * 1000)}
                for record in newest]

    def _queue_positions(self, wanted: set[str]) -> dict[str, int]:
        """Tasks ahead of each wanted task, in one walk of the queue that stops once all are found."""
        found: dict[str, int] = {}
        if not wanted:
            return found
        for ahead, task_id in enumerate(self.core.queue.ids()):
            if task_id in wanted:
                found[task_id] = ahead
                if len(found) == len(wanted):
                    break
        return found

    # -- tasks ---------------------------------------------------------------------------
    async def submit(self, request: Union[TaskRequest, EmbeddingRequest], task_id: str,
                     correlation_id: Optional[str] = None, context: Optional[TaskContext] = None) -> SubmitResult:
        """Admit and queue one task; returns the admission or an error envelope, never raises.
        ``context``: what the ingress knows of the task's session (see orch/pools/frames.py)."""
        return self.admission.submit(request, task_id, correlation_id, context or TaskContext())

    async def poll(self, task_id: str, cursor: int, wait_s: float, until_done: bool = False) -> PollResult:
        record = self.core.tasks.get(task_id)
        if record is None:
            return results.unknown_task(task_id, self.pool_id)
        events, done = await record.poll(cursor, wait_s, until_done)
        return results.page(events, done, first_token_marks(record, events))

    async def poll_many(self, requests: Sequence[tuple[str, int]], wait_s: float) -> list[PollResult]:
        """``poll`` for several tasks in one call, answered as soon as any of them has news
        (then with everything every one of them has): an ingress relays a step's tokens of
        all its streams on this pool with one message, not one per stream."""
        records = [self.core.tasks.get(task_id) for task_id, _ in requests]
        pages = await self._pages(requests, records)
        if wait_s <= 0 or any(page.events or page.done or page.error for page in pages):
            return pages
        await changed_any([record for record in records if record is not None], wait_s)
        await asyncio.sleep(0)  # the same step's other tokens land before the answer leaves
        return await self._pages(requests, records)

    async def _pages(self, requests: Sequence[tuple[str, int]],
                     records: list[Optional[TaskRecord]]) -> list[PollResult]:
        pages = []
        for (task_id, cursor), record in zip(requests, records):
            if record is None:
                pages.append(results.unknown_task(task_id, self.pool_id))
                continue
            events, done = await record.poll(cursor, 0.0)
            pages.append(results.page(events, done, first_token_marks(record, events)))
        return pages

    async def cancel(self, task_id: str) -> CancelResult:
        """Stop a task; once this returns no further token of it reaches any stream."""
        core = self.core
        record = core.tasks.get(task_id)
        if record is None:
            return results.cancel_not_found()
        was_queued = core.queue.cancel(task_id) is not None
        cut = record.cut_and_end(core.decode_ms(record))
        if cut is None:  # already over and fully streamed: nothing to stop
            return results.cancelled(False, record.tokens_out, True)
        if not record.ended_before_cancel:  # otherwise its own ending was counted already
            core.counts.cancelled(record.priority)
        acknowledged = await record.wait_acknowledged(cut, CANCEL_ACK_TIMEOUT_S)
        return results.cancelled(was_queued, record.tokens_before(cut), acknowledged)

    # -- the model: catalog binding, preparation, reload ---------------------------------
    async def bind(self, binding: CatalogBinding) -> PoolView:
        """Take a new catalog binding without restarting the actor (queued tasks stay): load
        the model a waiting pool was waiting for, swap a loaded one atomically, or hold."""
        if self.core.engine is None:
            return await self.start(binding)
        await self.swap.bind(binding)
        return self.snapshot()

    def set_preparation(self, prep: Optional[dict[str, Any]]) -> None:
        self.prep.set(prep)

    async def reload(self, new_model_ref: str, idle_timeout_s: float = RELOAD_IDLE_TIMEOUT_S) -> dict[str, Any]:
        """Swap the model atomically: Ready on the new model, or still Ready on the old one."""
        return await self.swap.reload(new_model_ref, idle_timeout_s)

    # -- operator control ----------------------------------------------------------------
    async def drain(self, deadline_ms: Optional[int]) -> dict[str, Any]:
        return await self.control.drain(deadline_ms)

    async def undrain(self) -> None:
        await self.control.undrain()

    async def purge(self) -> dict[str, Any]:
        return await self.control.purge()

    def set_supervision_note(self, note: Optional[str]) -> None:
        self.core.supervision_note = note


def _task_state(record: TaskRecord) -> str:
    """queued, running, ended, error or cancelled: how the task's own events say it finished."""
    if not record.terminal:
        return "running" if record.state == "running" else "queued"
    kind, data = record.events[-1]
    if kind == "error":
        return "error"
    return "cancelled" if data.get("finish_reason") == FinishReason.cancelled.value else "ended"
