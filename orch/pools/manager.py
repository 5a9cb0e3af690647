"""A pool: one engine, its bounded queue, its slots and its tasks' event buffers.

Plain asyncio, no Ray: ``orch.pools.actor`` hosts one of these per Ray actor. Blocking
engine work runs in a thread per slot; the event loop only moves events and answers calls,
so submit, poll and cancel stay fast while tokens are being generated.

A pool whose model is not present yet (a catalog ref not provisioned, see
orch/catalog/binding.py) holds instead of failing: it is not Ready, says why, and, when
the model is on its way, queues tasks without running them. Their exact admission checks
(the prompt's token count needs the model's tokenizer) wait until the model is loaded; a
task that does not fit then ends with a typed error. Their streams get ``metrics`` events
with the preparation's progress (``prep``) until the pool is Ready.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Optional, Union

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.api.tasks import DeterminismLevel, EmbeddingRequest, KVHint, Priority, TaskRequest
from orch.api.preparation import PrepStatus, PrepStep
from orch.core.forecast import RateTracker, on_time_probability
from orch.artifacts.transcript import build_transcript
from orch.catalog import binding as bindings
from orch.config import PoolConfig, project_root
from orch.core.admission import ModelLimits, check_context, check_request
from orch.core.capacity import GpuMemory, available_memory, check_fits
from orch.core.errors import OrchError
from orch.core.queue import QueueFullError, TaskQueue
from orch.engines import build_engine
from orch.engines.base import Engine, EngineError, GenerationParams
from orch.observability.pool_metrics import PoolMetrics
from orch.pools.task_record import TaskRecord

log = logging.getLogger("orch.pool")

#: How long cancel waits for stream consumers to acknowledge what they were handed.
CANCEL_ACK_TIMEOUT_S = 2.0
#: Finished tasks kept at most, whatever their age.
MAX_FINISHED_RECORDS = 10_000
#: How long a reload waits for in-flight tasks before giving up (and keeping the old model).
RELOAD_IDLE_TIMEOUT_S = 60.0
#: How often the watchdog looks at deadlines, stalled engines and stuck slots.
WATCHDOG_INTERVAL_S = 0.1
#: A running task gets a ``metrics`` frame when it starts and then at most this often.
METRICS_EVERY_S = 1.0
#: A queued task gets one when it has waited this long, and again after as long.
QUEUED_METRICS_EVERY_S = 2.0

#: Receives one summary per finished task: its transcript artifact and its usage.
FinishListener = Callable[[dict[str, Any]], Awaitable[None]]


class PoolManager:
    def __init__(self, config: PoolConfig, engine_factory: Callable[[PoolConfig], Engine] = build_engine) -> None:
        self.config = config
        self.pool_id = config.id
        self._engine_factory = engine_factory
        self.engine: Optional[Engine] = None
        self.queue: TaskQueue[TaskRecord] = TaskQueue(config.queue.capacity, config.queue.policy)
        self.tasks: dict[str, TaskRecord] = {}
        self.ready = False
        self.loading = False
        self.engine_failed = False
        self.supervision_note: Optional[str] = None
        self.draining = False
        self.drain_deadline_at: Optional[float] = None
        self.last_error: Optional[str] = None
        self.model_ref = config.model
        self.model_aliases: tuple[str, ...] = tuple(config.model_aliases)
        self.model_digest: Optional[str] = None
        self.finish_listeners: list[FinishListener] = []
        self._finished: Optional[asyncio.Queue] = None
        self._dispatch_open = asyncio.Event()
        self._dispatch_open.set()
        self._control_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self.active_slots = 0
        self._free_slots: list[int] = list(range(config.slots))
        self._executor = ThreadPoolExecutor(max_workers=config.slots + 1, thread_name_prefix=f"pool-{config.id}")
        self._work = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._janitor: Optional[asyncio.Task] = None
        self._watchdog: Optional[asyncio.Task] = None
        #: The task each busy slot runs (the watchdog's view of the slots).
        self._running: dict[int, TaskRecord] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._service_ms = 1000.0  # moving average of a task's run time
        self._started_lock = asyncio.Lock()
        self.metrics = PoolMetrics()
        #: The GPUs Ray granted this pool (their ids, comma-separated); set by the actor.
        self.device_mask: Optional[str] = None
        self.gpu_memory = GpuMemory(config.num_gpus, config.gpu_memory_bytes)
        #: Measured first-token time and decode rate, for the on-time forecast.
        self.rates = RateTracker()
        self.counters = {"enqueued": 0, "started": 0, "completed": 0, "cancelled": 0, "rejected": 0, "failed": 0,
                         "dropped": 0, "purged": 0, "reloads": 0, "reload_rollbacks": 0}
        #: What the catalog says this pool loads (orch/catalog/binding.py); None: its own ref.
        self.binding: Optional[dict[str, Any]] = None
        #: Why the pool holds instead of loading: bindings.WAITING or bindings.RETIRED; None: it does not.
        self.held: Optional[str] = None
        #: The preparation plan while the pool waits for its model (orch/api/preparation.py).
        self.preparation: Optional[dict[str, Any]] = None
        #: Tasks queued before the model was loaded, whose exact checks run once it is.
        self._deferred: dict[str, TaskRequest] = {}
        self._deliverer: Optional[asyncio.Task] = None
        #: The binding the loaded engine was built from (None: the configured ref itself).
        self._loaded_key: Optional[str] = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, binding: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Preload the model, then start the slot workers; Ready only after both. With a
        ``binding`` that says the model is not present (waiting, retired), hold instead."""
        async with self._started_lock:
            if self.ready or self._workers:
                return self.snapshot()
            self._loop = asyncio.get_running_loop()
            self._start_delivery()
            if binding is None and self.binding is None:  # the catalog's word has not come yet
                unbound = bindings.resolve(self.pool_id, self.config.engine.value, self.model_ref, [], [],
                                           project_root(), attached_url=self.config.engine_options.get("base_url"))
                binding = unbound if unbound["status"] == bindings.WAITING else None
            if binding is not None:
                self._take_binding(binding)
            if self.held:
                return self.snapshot()
            self.loading = True
            self._prep_step(PrepStep.pool_warmup, PrepStatus.running, 0, "loading the model")
            try:
                engine = self._new_engine(self.config)
                check_fits(self.pool_id, engine.memory_needed(),
                           available_memory(self.config.num_gpus, self.config.gpu_memory_bytes))
                await self._loop.run_in_executor(self._executor, engine.load)
            except (EngineError, OSError, ValueError) as exc:
                self.last_error = f"preload failed: {exc}"
                log.error("pool %s: %s", self.pool_id, self.last_error)
                self._prep_step(PrepStep.pool_warmup, PrepStatus.failed, 0, self.last_error)
                return self.snapshot()
            except Exception as exc:  # an engine bug must still leave a cause, never a silent hang
                self.last_error = f"preload failed: {type(exc).__name__}: {exc}"
                log.exception("pool %s: preload failed", self.pool_id)
                self._prep_step(PrepStep.pool_warmup, PrepStatus.failed, 0, self.last_error)
                return self.snapshot()
            finally:
                self.loading = False
            self.engine = engine
            self._loaded_key = (self.binding or {}).get("load_key")
            self._prepared()
            self._admit_deferred()
            self._workers = [asyncio.create_task(self._worker()) for _ in range(self.config.slots)]
            if self._watchdog is None:
                self._watchdog = asyncio.create_task(self._watch())
            self.ready = True
            self.last_error = None
            self._work.set()
            log.info("pool %s ready: %s %s, ctx %d", self.pool_id, engine.name, engine.version, engine.ctx_max)
            return self.snapshot()

    def _start_delivery(self) -> None:
        """Finished tasks' listeners and the janitor run from the start, so tasks that end
        while the pool waits for its model (cancelled, refused) leave transcripts too."""
        if self._deliverer is None:
            self._finished = asyncio.Queue()
            self._deliverer = asyncio.create_task(self._deliver_finished())
            self._janitor = asyncio.create_task(self._sweep_finished())

    def _new_engine(self, config: PoolConfig) -> Engine:
        """The engine for ``config``, with the catalog's file when the binding names one."""
        if config.model != self.model_ref:  # an operator's reload changed the model
            config = config.model_copy(update={"model": self.model_ref})
        binding = self.binding
        if binding is None or binding.get("status") != bindings.READY:
            return self._engine_factory(config)
        return self._engine_factory(config, binding)

    async def stop(self) -> None:
        self.ready = False
        for task in self._workers + [t for t in (self._janitor, self._deliverer, self._watchdog) if t is not None]:
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
            "replica_set": self.config.replica_set or self.pool_id,
            "engine": self.config.engine.value,
            "engine_version": engine.version if engine else "",
            "model_ref": self.model_ref,
            "model_aliases": self.model_aliases,
            "model_digest": self.model_digest,
            "model_id": (self.binding or {}).get("model_id"),
            "ready": self.ready,
            "waiting_for_model": self.held == bindings.WAITING,
            "model_retired": self.held == bindings.RETIRED,
            "binding": self._binding_summary(),
            "preparation": self.preparation,
            "draining": self.draining,
            "drained": self.draining and len(self.queue) == 0 and self.active_slots == 0,
            "workloads": self.workloads(),
            "chat_template": engine.chat_template if engine else None,
            "special_tokens": engine.special_tokens if engine else {},
            "slots": self.config.slots,
            "active_slots": self.active_slots,
            "queue_depth": len(self.queue),
            "queue_capacity": self.queue.capacity,
            "queue_policy": self.queue.policy.value,
            "ctx_max": engine.ctx_max if engine and self.ready else 0,
            "max_tokens_out": self.config.max_tokens_out,
            **self._vram(engine),
            "device_mask": self.device_mask,
            "last_error": self._error_text(),
            "loading": self.loading,
            "engine_failed": self.engine_failed,
            "service_ms": round(self._service_ms, 1),
            "queue_depth_by_priority": {p.value: self.queue.depth(p) for p in Priority},
            "metrics": self.metrics.to_dict(),
            "counters": dict(self.counters),
        }

    def _vram(self, engine: Optional[Engine]) -> dict[str, int]:
        try:
            total, free = self.gpu_memory.read(engine.memory_needed() if engine is not None else 0)
        except Exception:  # a probe must never break the snapshot
            total, free = 0, 0
        return {"vram_total_bytes": total, "vram_free_bytes": free}

    def _error_text(self) -> Optional[str]:
        if self.last_error and self.supervision_note:
            return f"{self.last_error} ({self.supervision_note})"
        return self.last_error or self.supervision_note

    def workloads(self) -> tuple[str, ...]:
        engine = self.engine
        if engine is None:
            return ("completion",)
        return tuple(name for name, served in (("completion", engine.serves_completions),
                                               ("embedding", engine.serves_embeddings)) if served)

    # -- admission -----------------------------------------------------------------------
    async def submit(
        self, request: Union[TaskRequest, EmbeddingRequest], task_id: str, correlation_id: Optional[str] = None,
        context: Optional[dict[str, Any]] = None,
    ) -> dict[str, Any]:
        """Admit and queue one task; returns the admission or an error envelope, never raises.
        ``context``: what the ingress knows of the task's session (see ``_metrics_frame``)."""
        try:
            return self._submit(request, task_id, correlation_id, context or {})
        except OrchError as exc:
            self.counters["rejected"] += 1
            self.metrics.rejected.inc(exc.code.value)
            if exc.code == ErrorCode.ADMISSION_REJECT:
                self.metrics.backpressure.inc(self.queue.policy.value)
            error = exc.to_dict()
            if exc.code == ErrorCode.POOL_UNREADY and self.preparation is not None and not self.ready:
                error["preparation"] = self.preparation
            return {"error": error}

    def _submit(self, request: Union[TaskRequest, EmbeddingRequest], task_id: str, correlation_id: Optional[str],
                context: dict[str, Any]) -> dict[str, Any]:
        deferred = False
        if not self.ready or self.engine is None:
            if self.engine is None and not self.draining and self.held != bindings.RETIRED \
                    and bindings.accepts_tasks(self.preparation):
                deferred = True  # queued now, checked and run once the model is loaded
            else:
                raise self._unready()
        if self.draining:
            raise OrchError(ErrorCode.POOL_UNREADY, f"pool '{self.pool_id}' is draining and admits no new work",
                            retriable=True, retry_after_ms=1000, pool_id=self.pool_id, engine=self.config.engine.value)
        if task_id in self.tasks:
            raise OrchError(ErrorCode.INVALID_PARAMS, f"task_id '{task_id}' is already in use; pick another or leave it out")
        if isinstance(request, EmbeddingRequest):
            if deferred:
                raise OrchError(ErrorCode.POOL_UNREADY, f"pool '{self.pool_id}' is preparing its model; embeddings "
                                "are admitted once it is Ready", retriable=True, retry_after_ms=1000,
                                pool_id=self.pool_id, engine=self.config.engine.value)
            record = self._embedding_record(request, task_id, correlation_id)
        else:
            record = self._completion_record(request, task_id, correlation_id, deferred=deferred)
        record.finalizer = self._finalize
        record.context = context
        record.bind_loop(self._loop)
        try:
            outcome = self.queue.enqueue(task_id, request.priority, record)
        except QueueFullError as exc:
            raise self._backpressure(exc) from None
        record.queue_position = outcome.position
        record.predicted_start_ms = self._predicted_start_ms(outcome.position)
        self.tasks[task_id] = record
        self.counters["enqueued"] += 1
        self.metrics.enqueued.inc(record.priority)
        if outcome.dropped is not None:
            self._drop(outcome.dropped)
        self._work.set()
        admission = {
            "task_id": task_id,
            "pool_id": self.pool_id,
            "queue_position": outcome.position,
            "predicted_start_ms": record.predicted_start_ms,
            "backoff_ms": self._backoff_ms(),
            "prompt_tokens": record.prompt_tokens,
            "seed": record.params.seed,
        }
        if deferred:
            self._deferred[task_id] = request
            self._push_metrics(record, time.monotonic())
            admission["preparation"] = self.preparation
        return admission

    def _completion_record(self, request: TaskRequest, task_id: str, correlation_id: Optional[str],
                           deferred: bool = False) -> TaskRecord:
        if deferred:  # no tokenizer yet: what the config alone can tell now, the rest once loaded
            if self.config.ctx is not None or self.config.max_tokens_out is not None:
                check_request(request, ModelLimits(ctx_max=self.config.ctx or 16_777_216,
                                                   max_tokens_out=self.config.max_tokens_out))
            ctx, prompt_tokens = request.ctx or 0, 0
        else:
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
            reuse_prefix=request.kv_hint != KVHint.cold and request.determinism != DeterminismLevel.strict,
        )
        return TaskRecord(
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
            request=request.model_dump(mode="json", exclude_none=True),
        )

    def _embedding_record(self, request: EmbeddingRequest, task_id: str, correlation_id: Optional[str]) -> TaskRecord:
        if not self.engine.serves_embeddings:
            raise OrchError(ErrorCode.INVALID_PARAMS, f"pool '{self.pool_id}' does not serve embeddings",
                            pool_id=self.pool_id, engine=self.config.engine.value)
        ctx = self.engine.ctx_max
        counts = [self.engine.count_tokens(text) for text in request.inputs]
        for index, count in enumerate(counts):
            if count > ctx:
                raise OrchError(ErrorCode.INVALID_PARAMS,
                                f"input[{index}] is {count} tokens; the model embeds at most {ctx} tokens per input",
                                pool_id=self.pool_id, engine=self.config.engine.value)
        return TaskRecord(
            task_id=task_id,
            priority=request.priority.value,
            prompt="",
            params=GenerationParams(max_tokens=1, seed=0),
            ctx=ctx,
            prompt_tokens=sum(counts),
            queue_position=0,
            predicted_start_ms=0,
            deadline_at=time.monotonic() + request.deadline_ms / 1000 if request.deadline_ms else None,
            session_id=request.session_id,
            correlation_id=correlation_id,
            inputs=list(request.inputs),
            request=request.model_dump(mode="json", exclude_none=True),
        )

    def _unready(self) -> OrchError:
        cause = f": {self.last_error}" if self.last_error else " (still loading)"
        if self.preparation is not None and self.preparation.get("reason") and not self.held == bindings.RETIRED:
            cause = f": {self.last_error or 'preparing its model'}; {self.preparation['reason']}"
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
        self.metrics.backpressure.inc(self.queue.policy.value)
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

    def recent_tasks(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest tasks, newest first, for an operator's status view: ids, state and
        progress only, never prompt text, so the answer is safe to show anyone who may
        see the pool."""
        now = time.monotonic()
        newest = heapq.nlargest(max(0, limit), self.tasks.values(), key=lambda record: record.admitted_at)
        positions = self._queue_positions({r.task_id for r in newest if r.state == "queued" and not r.terminal})
        return [
            {
                "task_id": record.task_id,
                "pool_id": self.pool_id,
                "state": _task_state(record),
                "priority": record.priority,
                "tokens_out": record.tokens_out,
                "queue_position": positions.get(record.task_id),
                "age_ms": int((now - record.admitted_at) * 1000),
            }
            for record in newest
        ]

    def _queue_positions(self, wanted: set[str]) -> dict[str, int]:
        """Tasks ahead of each wanted task, in one walk of the queue that stops once all are found."""
        found: dict[str, int] = {}
        if not wanted:
            return found
        for ahead, task_id in enumerate(self.queue.ids()):
            if task_id in wanted:
                found[task_id] = ahead
                if len(found) == len(wanted):
                    break
        return found

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
        if not record.ended_before_cancel:  # otherwise its own ending was counted already
            self.counters["cancelled"] += 1
            self.metrics.canceled.inc(record.priority)
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
            await self._dispatch_open.wait()  # closed while a reload swaps the engine
            item = self.queue.pop()
            if item is None:
                self._work.clear()
                await self._work.wait()
                continue
            _, record = item
            slot = self._free_slots.pop()
            self.active_slots += 1
            self._running[slot] = record
            try:
                await self._run(record, slot)
            except Exception as exc:  # never let one task kill the slot
                log.exception("pool %s: task %s failed", self.pool_id, record.task_id)
                self._fail(record, ErrorCode.INTERNAL, f"engine failed: {exc}")
            finally:
                self._running.pop(slot, None)
                self.active_slots -= 1
                self._free_slots.append(slot)

    async def _run(self, record: TaskRecord, slot: int) -> None:
        if record.terminal or record.cancelled:
            return
        now = time.monotonic()
        if record.deadline_at is not None and now >= record.deadline_at:
            self._fail(record, ErrorCode.DECODE_TIMEOUT, "deadline passed while the task was queued", retriable=True)
            return
        record.state = "running"
        record.started_at = now
        self.counters["started"] += 1
        self.metrics.started.inc(record.priority)
        waited = int((now - record.admitted_at) * 1000)
        log.info("started after %d ms queued", waited, extra=self._log_context(record, human=(
            f"Started on pool {self.pool_id} after waiting {waited} ms in the queue.")))
        if record.inputs is not None:
            await self._run_embedding(record, slot)
            return
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
        self._push_metrics(record, now)
        deadline_hit = False

        def emit(text: str) -> bool:
            nonlocal deadline_hit
            at = time.monotonic()
            if record.deadline_at is not None and at >= record.deadline_at:
                deadline_hit = True
                return False
            if record.tokens_out == 0:
                record.first_token_at = at
                self.metrics.first_token(record.priority, (at - record.admitted_at) * 1000)
            if not record.push_token(text):
                return False
            if at - (record.metrics_at or 0.0) >= METRICS_EVERY_S:
                self._push_metrics(record, at)
            return True

        try:
            if self.engine.generates_on_loop:
                finish = await self.engine.generate_async(slot, record.prompt, record.params, emit)
            else:
                finish = await self._loop.run_in_executor(
                    self._executor, self.engine.generate, slot, record.prompt, record.params, emit
                )
        except EngineError as exc:
            if exc.fatal:
                self._fail(record, ErrorCode.WORKER_RESET,
                           f"pool '{self.pool_id}' lost its engine ({exc}); resubmit the task",
                           retriable=True, retry_after_ms=1000)
                self._engine_fault(exc)
            else:
                self._fail(record, exc.code or ErrorCode.INTERNAL, str(exc))
            return
        finally:
            elapsed_ms = (time.monotonic() - now) * 1000
            self._service_ms = 0.8 * self._service_ms + 0.2 * elapsed_ms
        if not record.cancelled and record.first_token_at is not None:
            self.rates.observe((record.first_token_at - now) * 1000, record.tokens_out, elapsed_ms)
        if deadline_hit:
            self._fail(record, ErrorCode.DECODE_TIMEOUT, f"deadline passed after {record.tokens_out} tokens",
                       retriable=True)
            return
        if record.push("end", {"tokens_out": record.tokens_out, "decode_time_ms": self._decode_ms(record),
                               "finish_reason": finish.value}):
            self.counters["completed"] += 1

    async def _run_embedding(self, record: TaskRecord, slot: int) -> None:
        record.push("started", {
            "queue_position": record.queue_position,
            "predicted_start_ms": record.predicted_start_ms,
            "queue_wait_ms": int((record.started_at - record.admitted_at) * 1000),
            "pool_id": self.pool_id,
            "engine": self.config.engine.value,
            "engine_version": self.engine.version,
            "prompt_tokens": record.prompt_tokens,
        })
        try:
            vectors, tokens = await self._loop.run_in_executor(self._executor, self.engine.embed, slot, record.inputs)
        except EngineError as exc:
            self._fail(record, exc.code or ErrorCode.INTERNAL, str(exc))
            return
        if record.push("end", {"tokens_out": 0, "tokens_in": tokens, "decode_time_ms": self._decode_ms(record),
                               "finish_reason": FinishReason.stop.value, "embeddings": vectors}):
            self.counters["completed"] += 1

    async def _watch(self) -> None:
        """Keep deadlines even when the engine goes quiet, and notice a hung engine.

        The engine checks the deadline only when it emits a token, so a task whose engine
        stops emitting (or a queued task behind it) would never end; here it ends with
        DECODE_TIMEOUT. An engine that then keeps the slot past ``stuck_slot_grace_s`` is
        hung: the pool stops taking work and the supervisor restarts it.
        """
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            try:
                self._watch_once(time.monotonic())
            except Exception:  # the watchdog must outlive any one bad record
                log.exception("pool %s: watchdog pass failed", self.pool_id)

    def _watch_once(self, now: float) -> None:
        for record in list(self.tasks.values()):
            if record.state != "queued" or record.terminal:
                continue
            if record.deadline_at is not None and now >= record.deadline_at:
                self.queue.cancel(record.task_id)
                record.cancelled = True
                self._fail(record, ErrorCode.DECODE_TIMEOUT, "deadline passed while the task was queued",
                           retriable=True)
            elif now - (record.metrics_at or record.admitted_at) >= QUEUED_METRICS_EVERY_S:
                self._push_metrics(record, now)
        grace = self.config.stuck_slot_grace_s
        for slot, record in list(self._running.items()):
            if not record.terminal:
                overdue = self._overdue(record, now)
                if overdue:
                    record.cancelled = True  # the engine stops at its next token, if it ever emits one
                    self._fail(record, ErrorCode.DECODE_TIMEOUT, overdue, retriable=True)
            elif record.finished_at is not None and now - record.finished_at > grace and not self.engine_failed:
                self._engine_fault(EngineError(
                    f"slot {slot} still runs task {record.task_id} {grace:g} s after it ended; the engine is hung",
                    fatal=True))

    # -- metrics frames ------------------------------------------------------------------
    def _push_metrics(self, record: TaskRecord, now: float) -> None:
        if record.inputs is not None:  # embeddings: one step, nothing to follow
            return
        record.metrics_at = now
        try:
            frame = self._metrics_frame(record, now)
        except Exception:  # a frame is informational: never let it end a task
            log.exception("pool %s: metrics frame for %s failed", self.pool_id, record.task_id)
            return
        record.push("metrics", frame)

    def _metrics_frame(self, record: TaskRecord, now: float) -> dict[str, Any]:
        """What a client following the task wants to know now (SSEMetrics): the queue, the
        chance to meet its deadline at the pool's measured rates, whether its session's
        cache is warm, its session's budgets left, and (for ``?verbose=true``) a sentence."""
        queued = record.state == "queued"
        position = self.queue.position(record.task_id) if queued else None
        rate = self.rates.tokens_per_s
        frame: dict[str, Any] = {
            "queue_depth": len(self.queue),
            "queue_position": position,
            "on_time_probability": None,
            "kv_warmth": bool(record.context.get("kv_warmth", False)),
            "tokens_out": record.tokens_out,
            "tokens_per_s": round(rate, 1) if rate else None,
        }
        if record.deadline_at is not None:
            wait_ms = self._predicted_start_ms(position) if position is not None else 0.0
            estimate = self.rates.remaining_ms(max(0, record.params.max_tokens - record.tokens_out),
                                               first_token_seen=record.tokens_out > 0, wait_ms=wait_ms)
            if estimate is not None:
                frame["on_time_probability"] = on_time_probability((record.deadline_at - now) * 1000, *estimate)
        budgets = self._budgets_left(record, now)
        if budgets is not None:
            frame["budgets"] = budgets
        if record.task_id in self._deferred and self.preparation is not None:
            frame["prep"] = self.preparation
        frame["human"] = self._metrics_sentence(record, frame)
        return frame

    def _budgets_left(self, record: TaskRecord, now: float) -> Optional[dict[str, Any]]:
        """The session's budgets left at admission, less what this task has used so far."""
        budgets = record.context.get("budgets")
        if not budgets:
            return None
        prices = record.context.get("prices") or {}
        left: dict[str, Any] = {}
        if budgets.get("tokens") is not None:
            left["tokens"] = max(0, budgets["tokens"] - record.prompt_tokens - record.tokens_out)
        if budgets.get("time_ms") is not None:
            left["time_ms"] = max(0, budgets["time_ms"] - self._decode_ms(record))
        if budgets.get("cost") is not None:
            spent = (record.prompt_tokens * prices.get("in", 0.0) + record.tokens_out * prices.get("out", 0.0)) / 1000
            left["cost"] = round(max(0.0, budgets["cost"] - spent), 9)
        return left

    def _metrics_sentence(self, record: TaskRecord, frame: dict[str, Any]) -> str:
        if record.task_id in self._deferred:
            return f"Waiting for pool {self.pool_id} to prepare its model; the task runs once it is loaded."
        if frame["queue_position"] is not None:
            start = self._predicted_start_ms(frame["queue_position"]) / 1000
            said = (f"Waiting in pool {self.pool_id}'s queue at position {frame['queue_position'] + 1} of "
                    f"{frame['queue_depth']}; expected to start in about {start:.1f} s.")
        else:
            rate = f" at about {frame['tokens_per_s']:g} tokens/s" if frame["tokens_per_s"] else ""
            said = f"Generating on pool {self.pool_id}: {record.tokens_out} tokens so far{rate}."
        chance = frame["on_time_probability"]
        if chance is not None:
            said += f" {round(chance * 100)}% likely to finish before the deadline."
        if frame.get("budgets", {}).get("tokens") is not None:
            said += f" The session has {frame['budgets']['tokens']} tokens of budget left."
        return said

    def _overdue(self, record: TaskRecord, now: float) -> Optional[str]:
        if record.deadline_at is not None and now >= record.deadline_at:
            return f"deadline passed after {record.tokens_out} tokens; the engine produced nothing more in time"
        stall = self.config.stall_timeout_s
        quiet_since = record.last_event_at or record.started_at
        if stall is not None and quiet_since is not None and now - quiet_since > stall:
            return f"the engine produced nothing for {stall:g} s (stall_timeout_s) after {record.tokens_out} tokens"
        return None

    def _fail(self, record: TaskRecord, code: ErrorCode, message: str, *, retriable: bool = False,
              retry_after_ms: Optional[int] = None) -> bool:
        """End a task with a typed error, counted as failed only when the error is what the
        task ended with (not when a cancel ended it first)."""
        pushed = record.push("error", self._error_payload(code, message, retriable=retriable,
                                                           retry_after_ms=retry_after_ms))
        if pushed:
            self.counters["failed"] += 1
        return pushed

    def _engine_fault(self, exc: EngineError) -> None:
        """The engine itself failed: stop admitting, fail what is queued (retriable, so
        clients resubmit and placement picks a healthy pool), and let the supervisor restart us."""
        self.ready = False
        self.engine_failed = True
        self.draining = True
        self.last_error = f"engine failed: {exc}"
        log.error("pool %s: %s", self.pool_id, self.last_error, extra={
            "pool_id": self.pool_id, "human": f"Pool {self.pool_id} lost its engine and stopped taking work."})
        self._fail_queued(ErrorCode.WORKER_RESET, f"pool '{self.pool_id}' lost its engine before this task ran; "
                          "resubmit it")

    def _fail_queued(self, code: ErrorCode, message: str) -> None:
        """End every queued task with a retriable error (another pool, or this one later,
        may serve it)."""
        while (item := self.queue.pop()) is not None:
            _, queued = item
            queued.cancelled = True
            self._fail(queued, code, message, retriable=True, retry_after_ms=1000)

    def set_supervision_note(self, note: Optional[str]) -> None:
        self.supervision_note = note

    # -- transcripts and finish listeners ------------------------------------------------
    def _finalize(self, record: TaskRecord, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Build the task's transcript as it ends and name it in the terminal event.

        Runs under the record's lock, from whichever thread ends the task, so it only
        computes; delivery to the listeners (artifact store, sessions) happens on the loop.
        """
        engine = self.engine
        events = [(k, d) for k, d in record.events] + [(kind, _without_vectors(data))]
        transcript_id, body = build_transcript(
            task_id=record.task_id,
            pool_id=self.pool_id,
            engine=self.config.engine.value,
            engine_version=engine.version if engine else "",
            model_ref=self.model_ref,
            model_digest=self.model_digest,
            request=record.request,
            seed=record.params.seed if record.inputs is None else None,
            tokens_in=record.prompt_tokens,
            tokens_out=record.tokens_out,
            decode_time_ms=self._decode_ms(record),
            queue_wait_ms=int((record.started_at - record.admitted_at) * 1000) if record.started_at else None,
            events=events,
            session_id=record.session_id,
            correlation_id=record.correlation_id,
        )
        self.metrics.finished.inc("end" if kind == "end" else str(data.get("code", "error")))
        log.info("%s", kind, extra=self._log_context(record, human=self._ending_sentence(record, kind, data)))
        self.metrics.tokens.inc("in", record.prompt_tokens)
        self.metrics.tokens.inc("out", record.tokens_out)
        if record.started_at is not None:
            self.metrics.decoded(record.priority, self._decode_ms(record))
        summary = {
            "task_id": record.task_id,
            "pool_id": self.pool_id,
            "session_id": record.session_id,
            "outcome": kind,
            "error_code": data.get("code") if kind == "error" else None,
            "tokens_in": record.prompt_tokens,
            "tokens_out": record.tokens_out,
            "decode_time_ms": self._decode_ms(record),
            "transcript_id": transcript_id,
            "transcript": body,
        }
        if self._finished is not None and self._loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._loop:
                self._finished.put_nowait(summary)
            else:
                self._loop.call_soon_threadsafe(self._finished.put_nowait, summary)
        return dict(data, transcript_id=transcript_id)

    async def _deliver_finished(self) -> None:
        assert self._finished is not None
        while True:
            summary = await self._finished.get()
            for listener in list(self.finish_listeners):
                try:
                    await listener(summary)
                except Exception:  # a listener must never stop the others or the pool
                    log.exception("pool %s: finish listener failed for task %s", self.pool_id, summary["task_id"])

    # -- catalog binding and preparation --------------------------------------------------
    def _take_binding(self, binding: dict[str, Any]) -> None:
        """Adopt the catalog's word on this pool's model (no loading here)."""
        status = binding["status"]
        was_held = self.held is not None
        self.binding = dict(binding)
        self.model_digest = binding.get("model_digest") if status in (bindings.READY, bindings.RETIRED) else None
        if status in (bindings.WAITING, bindings.RETIRED):
            self.held = status
            self.last_error = binding.get("note")
            prep = binding.get("preparation")
            if prep is None and self.preparation is None:
                prep = bindings.preparation(binding, self.config.engine.value, fetch_allowed=False,
                                            blocked_reason="the model catalog has not been consulted yet")
            if prep is not None:
                self.set_preparation(prep)
            return
        self.held = None
        if was_held:
            self.last_error = None

    def _binding_summary(self) -> Optional[dict[str, Any]]:
        binding = self.binding
        if binding is None:
            return None
        return {key: binding.get(key) for key in ("status", "load_key", "failed_key", "model_id", "handoff_id",
                                                   "engine_mode", "engine_url", "engine_version", "runtime_env_key")}

    def set_preparation(self, prep: Optional[dict[str, Any]]) -> None:
        """The supervisor's view of the preparation (fetch progress from the catalog); the
        pool's own warm-up step is kept. Waiting tasks get a ``metrics`` event on a change."""
        if prep is None or (self.engine is not None and not self.held):
            return
        current = self.preparation
        if current is not None:
            mine = bindings.step_of(current, PrepStep.pool_warmup)
            if mine["status"] != PrepStatus.pending.value:
                prep = bindings.with_step(prep, PrepStep.pool_warmup, PrepStatus(mine["status"]), mine["pct"],
                                          mine.get("detail"))
        if prep == current:
            return
        self.preparation = prep
        self._push_prep()

    def _prep_step(self, step: PrepStep, status: PrepStatus, pct: float, detail: Optional[str] = None) -> None:
        if self.preparation is not None:
            self.preparation = bindings.with_step(self.preparation, step, status, pct, detail)
            self._push_prep()

    def _push_prep(self) -> None:
        for task_id in list(self._deferred):
            record = self.tasks.get(task_id)
            if record is not None and not record.terminal:
                now = time.monotonic()
                record.metrics_at = now
                record.push("metrics", dict(self._metrics_frame(record, now), prep=self.preparation))

    def _prepared(self) -> None:
        """The model is loaded: the preparation is over (its last event says so)."""
        if self.preparation is not None:
            self._prep_step(PrepStep.pool_warmup, PrepStatus.done, 100, "ready")
        self.preparation = None
        self.held = None

    def _admit_deferred(self) -> None:
        """The checks that needed the model, for the tasks queued before it was loaded; a task
        that does not fit ends now with the typed error admission would have given it."""
        deferred, self._deferred = self._deferred, {}
        for task_id, request in deferred.items():
            record = self.tasks.get(task_id)
            if record is None or record.terminal or record.state != "queued":
                continue
            try:
                ctx = check_request(request, self.limits())
                prompt_tokens = self.engine.count_tokens(request.prompt)
                check_context(prompt_tokens, request.max_tokens, ctx)
            except OrchError as exc:
                self.queue.cancel(task_id)
                record.cancelled = True
                self.counters["rejected"] += 1
                self.metrics.rejected.inc(exc.code.value)
                record.push("error", self._error_payload(
                    exc.code, f"{exc.message} (checked once the model was loaded)", retriable=exc.retriable))
                continue
            record.ctx, record.prompt_tokens = ctx, prompt_tokens

    async def bind(self, binding: dict[str, Any]) -> dict[str, Any]:
        """Take a new catalog binding without restarting the actor (queued tasks stay): load
        the model a waiting pool was waiting for, swap a loaded one atomically, or hold."""
        if self.engine is None:
            return await self.start(binding)
        async with self._control_lock:
            status = binding["status"]
            same_file = self._already_loaded(binding)
            if status in (bindings.WAITING, bindings.RETIRED):
                self._hold_loaded(binding)
            elif binding.get("load_key") == self._loaded_key or (self._loaded_key is None and status == bindings.LOCAL) \
                    or same_file:
                if same_file:
                    self._loaded_key = binding.get("load_key")
                self._take_binding(binding)
                self.preparation = None
                self.ready = not self.engine_failed
            else:
                await self._swap_binding(binding)
            return self.snapshot()

    def _already_loaded(self, binding: dict[str, Any]) -> bool:
        """The binding names exactly the file the engine has loaded, in this process (an
        operator's reload resolved the same model): adopt it, loading nothing again."""
        if binding.get("status") != bindings.READY or not binding.get("model_path"):
            return False
        if binding.get("engine_url") or binding.get("engine_binary") or binding.get("runtime_env"):
            return False
        loaded = getattr(self.engine, "model_path", None) or getattr(self.engine, "model_dir", None)
        try:
            return loaded is not None and Path(loaded).resolve() == Path(binding["model_path"]).resolve()
        except OSError:
            return False

    def _hold_loaded(self, binding: dict[str, Any]) -> None:
        """A loaded model the catalog no longer offers (retired, removed): stop admitting and
        end what is queued (retriably; another pool may serve it); running tasks finish."""
        self.ready = False
        self.preparation = None
        self._take_binding(binding)
        self._fail_queued(ErrorCode.POOL_UNAVAILABLE,
                          f"pool '{self.pool_id}' stopped serving its model before this task ran: {binding.get('note')}")
        log.warning("pool %s holds: %s", self.pool_id, binding.get("note"),
                    extra={"pool_id": self.pool_id, "human": f"Pool {self.pool_id} stopped serving: {binding.get('note')}"})

    async def _swap_binding(self, binding: dict[str, Any], idle_timeout_s: float = RELOAD_IDLE_TIMEOUT_S) -> None:
        """Load what the new binding names next to the current engine, then switch; on any
        failure keep the current engine and mark the binding failed (the supervisor restarts)."""
        old_engine, old_binding = self.engine, self.binding
        self._dispatch_open.clear()
        try:
            deadline = time.monotonic() + idle_timeout_s
            while self.active_slots > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            try:
                if self.active_slots > 0:
                    raise EngineError(f"in-flight tasks did not finish within {idle_timeout_s:.0f} s")
                self.binding = binding
                new_engine = self._new_engine(self.config)
                await self._loop.run_in_executor(self._executor, new_engine.load)
            except Exception as exc:  # whatever failed, the current engine keeps serving
                self.binding = dict(old_binding or {}, failed_key=binding.get("load_key")) if old_binding else {
                    "status": bindings.LOCAL, "failed_key": binding.get("load_key")}
                self.last_error = f"binding the catalog's model failed: {exc}"
                self.counters["reload_rollbacks"] += 1
                log.error("pool %s: %s", self.pool_id, self.last_error)
                return
            self.engine = new_engine
            self._loaded_key = binding.get("load_key")
            self._take_binding(binding)
            self.preparation = None
            self.ready = True
            self.last_error = None
            self.counters["reloads"] += 1
            await self._loop.run_in_executor(self._executor, old_engine.close)
            log.info("pool %s bound to %s (%s)", self.pool_id, binding.get("model_path") or binding.get("engine_url"),
                     binding.get("model_digest"))
        finally:
            self._dispatch_open.set()
            self._work.set()

    # -- operator control ----------------------------------------------------------------
    async def drain(self, deadline_ms: Optional[int]) -> dict[str, Any]:
        """Stop admitting; let queued and running work finish. Past the deadline, what is
        left ends with a retriable error so no client waits forever."""
        self.draining = True
        self.drain_deadline_at = time.monotonic() + deadline_ms / 1000 if deadline_ms else None
        if deadline_ms:
            task = asyncio.create_task(self._enforce_drain_deadline(deadline_ms / 1000))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return {"pool_id": self.pool_id, "draining": True, "queued": len(self.queue), "active": self.active_slots,
                "deadline_ms": deadline_ms}

    async def _enforce_drain_deadline(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if len(self.queue) == 0 and self.active_slots == 0:
                return
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if not self.draining:
            return
        message = f"pool '{self.pool_id}' was drained by an operator before this task finished; resubmit it"
        for record in list(self.tasks.values()):
            if record.terminal:
                continue
            self.queue.cancel(record.task_id)
            record.cancelled = True
            if record.push("error", self._error_payload(ErrorCode.POOL_UNAVAILABLE, message, retriable=True,
                                                        retry_after_ms=1000)):
                self.counters["failed"] += 1

    async def undrain(self) -> None:
        self.draining = False
        self.drain_deadline_at = None

    async def reload(self, new_model_ref: str, idle_timeout_s: float = RELOAD_IDLE_TIMEOUT_S) -> dict[str, Any]:
        """Swap the model atomically: Ready on the new model, or still Ready on the old one.

        Dispatch pauses (new tasks still queue), running tasks finish, the new model loads
        next to the old one, and only then is the old one closed; on any failure the old
        engine was never touched and dispatch resumes on it.
        """
        async with self._control_lock:
            old_engine, old_ref = self.engine, self.model_ref
            if old_engine is None:
                return await self._first_load(new_model_ref)
            self._dispatch_open.clear()
            try:
                deadline = time.monotonic() + idle_timeout_s
                while self.active_slots > 0:
                    if time.monotonic() >= deadline:
                        return self._rolled_back(old_ref, f"in-flight tasks did not finish within {idle_timeout_s:.0f} s")
                    await asyncio.sleep(0.02)
                try:
                    new_engine = self._engine_factory(self.config.model_copy(update={"model": new_model_ref}))
                    await self._loop.run_in_executor(self._executor, new_engine.load)
                except (EngineError, OSError, ValueError) as exc:
                    return self._rolled_back(old_ref, str(exc))
                self.engine = new_engine
                self.model_ref = new_model_ref
                self.model_aliases = ()
                self.model_digest = None
                self.binding, self._loaded_key = None, None  # the catalog's binding described the previous model
                self.draining = False
                self.counters["reloads"] += 1
                await self._loop.run_in_executor(self._executor, old_engine.close)
                log.info("pool %s reloaded: %s -> %s", self.pool_id, old_ref, new_model_ref)
                return {"pool_id": self.pool_id, "reloaded": True, "rolled_back": False, "model_ref": new_model_ref,
                        "previous_model_ref": old_ref, "engine_version": new_engine.version, "ctx_max": new_engine.ctx_max}
            finally:
                self._dispatch_open.set()
                self._work.set()

    async def _first_load(self, new_model_ref: str) -> dict[str, Any]:
        """A pool that never loaded takes the new model as its first."""
        self.config = self.config.model_copy(update={"model": new_model_ref})
        self.model_ref, self.model_aliases = new_model_ref, ()
        self.binding, self.held = None, None  # the catalog's binding described the previous model
        snapshot = await self.start()
        if not snapshot["ready"]:
            return {"pool_id": self.pool_id, "reloaded": False, "rolled_back": False, "model_ref": new_model_ref,
                    "error": self.last_error}
        return {"pool_id": self.pool_id, "reloaded": True, "rolled_back": False, "model_ref": new_model_ref}

    def _rolled_back(self, old_ref: str, cause: str) -> dict[str, Any]:
        self.counters["reload_rollbacks"] += 1
        log.warning("pool %s: reload failed (%s); still serving %s", self.pool_id, cause, old_ref)
        return {"pool_id": self.pool_id, "reloaded": False, "rolled_back": True, "model_ref": old_ref,
                "error": f"reload failed: {cause}; rolled back, still serving {old_ref}"}

    async def purge(self) -> dict[str, Any]:
        """Drop every queued task (each gets a retriable error) and forget finished ones."""
        purged = 0
        message = f"removed from the queue of pool '{self.pool_id}' by an operator purge; resubmit it"
        while True:
            item = self.queue.pop()
            if item is None:
                break
            _, record = item
            record.cancelled = True
            if record.push("error", self._error_payload(ErrorCode.POOL_UNAVAILABLE, message, retriable=True,
                                                        retry_after_ms=1000)):
                purged += 1
        # Only records whose every event was handed to a stream: nobody can still be reading them.
        forgotten = [tid for tid, r in self.tasks.items() if r.terminal and r.handed_out >= len(r.events)]
        for task_id in forgotten:
            self.tasks.pop(task_id, None)
        self.counters["purged"] += purged
        return {"pool_id": self.pool_id, "purged_queued": purged, "forgotten_finished": len(forgotten),
                "running": self.active_slots}

    def health(self) -> dict[str, Any]:
        snap = self.snapshot()
        snap.pop("chat_template", None)
        snap["live"] = True
        return snap

    def _log_context(self, record: TaskRecord, human: str) -> dict[str, Any]:
        return {"task_id": record.task_id, "session_id": record.session_id, "pool_id": self.pool_id,
                "engine": self.config.engine.value, "correlation_id": record.correlation_id, "human": human}

    def _ending_sentence(self, record: TaskRecord, kind: str, data: dict[str, Any]) -> str:
        if kind == "end" and data.get("finish_reason") == FinishReason.cancelled.value:
            return f"Cancelled on pool {self.pool_id} after {record.tokens_out} token(s)."
        if kind == "end":
            if record.inputs is not None:
                return f"Embedded {len(record.inputs)} input(s) on pool {self.pool_id}."
            return (f"Finished on pool {self.pool_id}: {record.tokens_out} token(s) in "
                    f"{self._decode_ms(record)} ms ({data.get('finish_reason', 'done')}).")
        return f"Failed on pool {self.pool_id} after {record.tokens_out} token(s): {data.get('message', 'error')}"

    @staticmethod
    def _decode_ms(record: TaskRecord) -> int:
        if record.started_at is None:
            return 0
        return int((time.monotonic() - record.started_at) * 1000)

    async def _sweep_finished(self) -> None:
        retain = self.config.retain_finished_s
        while True:
            await asyncio.sleep(min(retain / 4, 30))
            self._sweep_once(time.monotonic(), retain)

    def _sweep_once(self, now: float, retain: float) -> None:
        """One sweep, in its own frame so no list of swept records outlives it."""
        finished = [r for r in self.tasks.values() if r.finished_at is not None]
        expired = {r.task_id for r in finished if now - r.finished_at > retain}
        overflow = len(finished) - len(expired) - MAX_FINISHED_RECORDS
        if overflow > 0:
            rest = sorted((r for r in finished if r.task_id not in expired), key=lambda r: r.finished_at)
            expired.update(r.task_id for r in rest[:overflow])
        for task_id in expired:
            self.tasks.pop(task_id, None)



def _task_state(record: TaskRecord) -> str:
    """queued, running, ended, error or cancelled: how the task's own events say it finished."""
    if not record.terminal:
        return "running" if record.state == "running" else "queued"
    kind, data = record.events[-1]
    if kind == "error":
        return "error"
    return "cancelled" if data.get("finish_reason") == FinishReason.cancelled.value else "ended"


def _without_vectors(data: dict[str, Any]) -> dict[str, Any]:
    """Transcripts record that vectors were returned, not the vectors themselves."""
    vectors = data.get("embeddings")
    if not vectors:
        return data
    return {k: v for k, v in data.items() if k != "embeddings"} | {
        "embeddings_returned": len(vectors), "embedding_dim": len(vectors[0])}
