"""A pool: one engine, its bounded queue, its slots and its tasks' event buffers.

Plain asyncio, no Ray: ``orch.pools.actor`` hosts one of these per Ray actor. Blocking
engine work runs in a thread per slot; the event loop only moves events and answers calls,
so submit, poll and cancel stay fast while tokens are being generated.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.api.tasks import Priority, TaskRequest
from orch.config import PoolConfig
from orch.core.admission import ModelLimits, check_context, check_request
from orch.core.errors import OrchError
from orch.core.queue import QueueFullError, QueuePolicy, TaskQueue
from orch.engines import build_engine
from orch.engines.base import Engine, EngineError, GenerationParams
from orch.pools.task_record import TaskRecord

log = logging.getLogger("orch.pool")

#: How long cancel waits for stream consumers to acknowledge what they were handed.
CANCEL_ACK_TIMEOUT_S = 2.0
#: Finished tasks kept at most, whatever their age.
MAX_FINISHED_RECORDS = 10_000


class PoolManager:
    def __init__(self, config: PoolConfig, engine_factory: Callable[[PoolConfig], Engine] = build_engine) -> None:
        self.config = config
        self.pool_id = config.id
        self._engine_factory = engine_factory
        self.engine: Optional[Engine] = None
        self.queue: TaskQueue[TaskRecord] = TaskQueue(config.queue.capacity, config.queue.policy)
        self.tasks: dict[str, TaskRecord] = {}
        self.ready = False
        self.draining = False
        self.last_error: Optional[str] = None
        self.active_slots = 0
        self._free_slots: list[int] = list(range(config.slots))
        self._executor = ThreadPoolExecutor(max_workers=config.slots + 1, thread_name_prefix=f"pool-{config.id}")
        self._work = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._janitor: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._service_ms = 1000.0  # moving average of a task's run time
        self._started_lock = asyncio.Lock()
        self.counters = {"enqueued": 0, "started": 0, "completed": 0, "cancelled": 0, "rejected": 0, "failed": 0, "dropped": 0}

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Preload the model, then start the slot workers; Ready only after both."""
        async with self._started_lock:
            if self.ready or self._workers:
                return self.snapshot()
            self._loop = asyncio.get_running_loop()
            try:
                engine = self._engine_factory(self.config)
                await self._loop.run_in_executor(self._executor, engine.load)
            except (EngineError, OSError, ValueError) as exc:
                self.last_error = f"preload failed: {exc}"
                log.error("pool %s: %s", self.pool_id, self.last_error)
                return self.snapshot()
            self.engine = engine
            self._workers = [asyncio.create_task(self._worker()) for _ in range(self.config.slots)]
            self._janitor = asyncio.create_task(self._sweep_finished())
            self.ready = True
            self.last_error = None
            log.info("pool %s ready: %s %s, ctx %d", self.pool_id, engine.name, engine.version, engine.ctx_max)
            return self.snapshot()

    async def stop(self) -> None:
        self.ready = False
        for task in self._workers + ([self._janitor] if self._janitor else []):
            task.cancel()
        for record in list(self.tasks.values()):
            if not record.terminal:
                record.cancelled = True
                record.push("error", self._error_payload(ErrorCode.WORKER_RESET, "pool is shutting down", retriable=True))
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()

    # -- snapshot ------------------------------------------------------------------------
    def limits(self) -> ModelLimits:
        return ModelLimits(ctx_max=self.engine.ctx_max if self.engine else 0, max_tokens_out=self.config.max_tokens_out)

    def snapshot(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "pool_id": self.pool_id,
            "engine": self.config.engine.value,
            "engine_version": engine.version if engine else "",
            "model_ref": self.config.model,
            "model_aliases": tuple(self.config.model_aliases),
            "ready": self.ready,
            "draining": self.draining,
            "slots": self.config.slots,
            "active_slots": self.active_slots,
            "queue_depth": len(self.queue),
            "queue_capacity": self.queue.capacity,
            "queue_policy": self.queue.policy.value,
            "ctx_max": engine.ctx_max if engine and self.ready else 0,
            "max_tokens_out": self.config.max_tokens_out,
            "vram_free_bytes": 0,
            "vram_total_bytes": 0,
            "device_mask": None,
            "last_error": self.last_error,
            "service_ms": round(self._service_ms, 1),
            "counters": dict(self.counters),
        }

    # -- admission -----------------------------------------------------------------------
    async def submit(self, request: TaskRequest, task_id: str, correlation_id: Optional[str] = None) -> dict[str, Any]:
        """Admit and queue one task; returns the admission or an error envelope, never raises."""
        try:
            return self._submit(request, task_id, correlation_id)
        except OrchError as exc:
            self.counters["rejected"] += 1
            return {"error": exc.to_dict()}

    def _submit(self, request: TaskRequest, task_id: str, correlation_id: Optional[str]) -> dict[str, Any]:
        if not self.ready or self.engine is None:
            raise self._unready()
        if self.draining:
            raise OrchError(ErrorCode.POOL_UNREADY, f"pool '{self.pool_id}' is draining", retriable=True,
                            retry_after_ms=1000, pool_id=self.pool_id, engine=self.config.engine.value)
        if task_id in self.tasks:
            raise OrchError(ErrorCode.INVALID_PARAMS, f"task_id '{task_id}' is already in use; pick another or leave it out")
        ctx = check_request(request, self.limits())
        prompt_tokens = self.engine.count_tokens(request.prompt)
        check_context(prompt_tokens, request.max_tokens, ctx)
        seed = request.seed if request.seed is not None else random.getrandbits(32)
        params = GenerationParams(
            max_tokens=request.max_tokens,
            seed=seed,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stop=tuple(request.stop),
        )
        record = TaskRecord(
            task_id=task_id,
            priority=request.priority.value,
            prompt=request.prompt,
            params=params,
            ctx=ctx,
            prompt_tokens=prompt_tokens,
            queue_position=0,
            predicted_start_ms=0,
            deadline_at=time.monotonic() + request.deadline_ms / 1000 if request.deadline_ms else None,
            session_id=request.session_id,
            correlation_id=correlation_id,
        )
        record.bind_loop(self._loop)
        try:
            outcome = self.queue.enqueue(task_id, request.priority, record)
        except QueueFullError as exc:
            raise self._backpressure(exc) from None
        record.queue_position = outcome.position
        record.predicted_start_ms = self._predicted_start_ms(outcome.position)
        self.tasks[task_id] = record
        self.counters["enqueued"] += 1
        if outcome.dropped is not None:
            self._drop(outcome.dropped)
        self._work.set()
        return {
            "task_id": task_id,
            "pool_id": self.pool_id,
            "queue_position": outcome.position,
            "predicted_start_ms": record.predicted_start_ms,
            "backoff_ms": self._backoff_ms(),
            "prompt_tokens": prompt_tokens,
            "seed": seed,
        }

    def _unready(self) -> OrchError:
        cause = f": {self.last_error}" if self.last_error else " (still loading)"
        return OrchError(ErrorCode.POOL_UNREADY, f"pool '{self.pool_id}' is not Ready{cause}", retriable=True,
                         retry_after_ms=1000, pool_id=self.pool_id, engine=self.config.engine.value)

    def _per_slot_ms(self) -> float:
        return self._service_ms / self.config.slots

    def _predicted_start_ms(self, position: int) -> int:
        free = self.config.slots - self.active_slots
        if position < free:
            return 0
        return int(self._per_slot_ms() * (position - free + 1))

    def _backoff_ms(self) -> int:
        return 0 if len(self.queue) < self.queue.capacity // 2 else int(self._per_slot_ms())

    def _backpressure(self, exc: QueueFullError) -> OrchError:
        retry_ms = max(100, int(self._per_slot_ms()))
        return OrchError(
            ErrorCode.ADMISSION_REJECT,
            f"pool '{self.pool_id}' queue is full ({exc.capacity} tasks); retry after {retry_ms} ms",
            retriable=True,
            retry_after_ms=retry_ms,
            policy_label=exc.policy.value,
            pool_id=self.pool_id,
            engine=self.config.engine.value,
        )

    def _drop(self, task_id: str) -> None:
        record = self.tasks.get(task_id)
        if record is None:
            return
        self.counters["dropped"] += 1
        record.push("error", self._error_payload(
            ErrorCode.QUEUE_FULL_DROP_LRU,
            f"dropped from the full queue of pool '{self.pool_id}' to make room for newer work (policy drop-lru)",
            retriable=True, retry_after_ms=max(100, int(self._per_slot_ms()))))

    def _error_payload(self, code: ErrorCode, message: str, *, retriable: bool = False, retry_after_ms: Optional[int] = None) -> dict:
        payload: dict[str, Any] = {"code": code.value, "message": message, "retriable": retriable,
                                   "engine": self.config.engine.value, "pool_id": self.pool_id}
        if retry_after_ms is not None:
            payload["retry_after_ms"] = retry_after_ms
        return payload

    # -- streaming -----------------------------------------------------------------------
    def has_task(self, task_id: str) -> bool:
        return task_id in self.tasks

    async def poll(self, task_id: str, cursor: int, wait_s: float) -> dict[str, Any]:
        record = self.tasks.get(task_id)
        if record is None:
            return {"error": OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}' in pool '{self.pool_id}'").to_dict()}
        events, done = await record.poll(cursor, wait_s)
        return {"events": events, "done": done}

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """Stop a task; once this returns no further token of it reaches any stream."""
        record = self.tasks.get(task_id)
        if record is None:
            return {"found": False}
        was_queued = self.queue.cancel(task_id) is not None
        cut = record.cut_and_end({"decode_time_ms": self._decode_ms(record), "finish_reason": FinishReason.cancelled.value})
        if cut is None:  # already over and fully streamed: nothing to stop
            return {"found": True, "was_queued": False, "tokens_sent": record.tokens_out, "acknowledged": True}
        self.counters["cancelled"] += 1
        acknowledged = await record.wait_acknowledged(cut, CANCEL_ACK_TIMEOUT_S)
        return {
            "found": True,
            "was_queued": was_queued,
            "tokens_sent": record.tokens_before(cut),
            "acknowledged": acknowledged,
        }

    # -- execution -----------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            item = self.queue.pop()
            if item is None:
                self._work.clear()
                await self._work.wait()
                continue
            _, record = item
            slot = self._free_slots.pop()
            self.active_slots += 1
            try:
                await self._run(record, slot)
            except Exception as exc:  # never let one task kill the slot
                log.exception("pool %s: task %s failed", self.pool_id, record.task_id)
                self.counters["failed"] += 1
                record.push("error", self._error_payload(ErrorCode.INTERNAL, f"engine failed: {exc}"))
            finally:
                self.active_slots -= 1
                self._free_slots.append(slot)

    async def _run(self, record: TaskRecord, slot: int) -> None:
        if record.terminal or record.cancelled:
            return
        now = time.monotonic()
        if record.deadline_at is not None and now >= record.deadline_at:
            self.counters["failed"] += 1
            record.push("error", self._error_payload(ErrorCode.DECODE_TIMEOUT, "deadline passed while the task was queued", retriable=True))
            return
        record.state = "running"
        record.started_at = now
        self.counters["started"] += 1
        record.push("started", {
            "queue_position": record.queue_position,
            "predicted_start_ms": record.predicted_start_ms,
            "queue_wait_ms": int((now - record.admitted_at) * 1000),
            "pool_id": self.pool_id,
            "engine": self.config.engine.value,
            "engine_version": self.engine.version,
            "seed": record.params.seed,
            "prompt_tokens": record.prompt_tokens,
        })
        deadline_hit = False

        def emit(text: str) -> bool:
            nonlocal deadline_hit
            if record.deadline_at is not None and time.monotonic() >= record.deadline_at:
                deadline_hit = True
                return False
            return record.push_token(text)

        try:
            finish = await self._loop.run_in_executor(
                self._executor, self.engine.generate, slot, record.prompt, record.params, emit
            )
        except EngineError as exc:
            self.counters["failed"] += 1
            record.push("error", self._error_payload(ErrorCode.INTERNAL, str(exc)))
            return
        finally:
            elapsed_ms = (time.monotonic() - now) * 1000
            self._service_ms = 0.8 * self._service_ms + 0.2 * elapsed_ms
        if deadline_hit:
            self.counters["failed"] += 1
            record.push("error", self._error_payload(
                ErrorCode.DECODE_TIMEOUT, f"deadline passed after {record.tokens_out} tokens", retriable=True))
            return
        if record.push("end", {"tokens_out": record.tokens_out, "decode_time_ms": self._decode_ms(record),
                               "finish_reason": finish.value}):
            self.counters["completed"] += 1

    @staticmethod
    def _decode_ms(record: TaskRecord) -> int:
        if record.started_at is None:
            return 0
        return int((time.monotonic() - record.started_at) * 1000)

    async def _sweep_finished(self) -> None:
        retain = self.config.retain_finished_s
        while True:
            await asyncio.sleep(min(retain / 4, 30))
            now = time.monotonic()
            finished = [r for r in self.tasks.values() if r.finished_at is not None]
            expired = {r.task_id for r in finished if now - r.finished_at > retain}
            overflow = len(finished) - len(expired) - MAX_FINISHED_RECORDS
            if overflow > 0:
                rest = sorted((r for r in finished if r.task_id not in expired), key=lambda r: r.finished_at)
                expired.update(r.task_id for r in rest[:overflow])
            for task_id in expired:
                self.tasks.pop(task_id, None)
