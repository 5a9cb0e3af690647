"""Admission into one pool: the checks a task must pass, its record, its place in the queue,
and the predictions (start time, backoff) given back with it.

A pool whose model is not present yet admits tasks it cannot check exactly (the prompt's
token count needs the model's tokenizer): they wait in the queue as ``deferred`` and get
their exact checks once the model is loaded (``admit_deferred``); a task that does not fit
then ends with the typed error admission would have given it.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any, Callable, Optional, Union

from orch.api.errors import ErrorCode
from orch.api.pools import SubmitResult, TaskContext
from orch.api.tasks import DeterminismLevel, EmbeddingRequest, KVHint, TaskRequest
from orch.catalog import binding as bindings
from orch.core import engine_features
from orch.core.admission import ModelLimits, check_context, check_request
from orch.core.errors import OrchError
from orch.core.queue import QueueFullError
from orch.engines.base import GenerationParams
from orch.pools import results
from orch.pools.core import RETRY_AFTER_MS, PoolCore
from orch.pools.task_record import TaskRecord

Request = Union[TaskRequest, EmbeddingRequest]
#: Pushes a task's ``metrics`` frame (orch/pools/frames.py).
PushFrame = Callable[[TaskRecord, float], None]
#: Builds a finished task's transcript (orch/pools/finish.py); the record's finalizer.
Finalizer = Callable[[TaskRecord, str, dict[str, Any]], dict[str, Any]]


def predicted_start_ms(core: PoolCore, position: int) -> int:
    free = core.config.slots - core.active_slots
    if position < free:
        return 0
    return int(core.per_slot_ms() * (position - free + 1))


def backoff_ms(core: PoolCore) -> int:
    return 0 if len(core.queue) < core.queue.capacity // 2 else int(core.per_slot_ms())


class Admission:
    def __init__(self, core: PoolCore, push_frame: PushFrame, finalizer: Finalizer) -> None:
        self.core = core
        self.push_frame = push_frame
        self.finalizer = finalizer

    def submit(self, request: Request, task_id: str, correlation_id: Optional[str],
               context: TaskContext) -> SubmitResult:
        """Admit and queue one task; returns the admission or an error envelope, never raises."""
        core = self.core
        try:
            return self._admit(request, task_id, correlation_id, context)
        except OrchError as exc:
            core.counts.rejected(exc.code.value)
            if exc.code == ErrorCode.ADMISSION_REJECT:
                core.metrics.backpressure.inc(core.queue.policy.value)
            preparing = exc.code == ErrorCode.POOL_UNREADY and core.preparation is not None and not core.life.ready
            return results.refused(exc, core.preparation if preparing else None)

    def _admit(self, request: Request, task_id: str, correlation_id: Optional[str],
               context: TaskContext) -> SubmitResult:
        core = self.core
        deferred = self._check_open(request, task_id)
        if isinstance(request, EmbeddingRequest):
            record = self._embedding_record(request, task_id, correlation_id)
        else:
            record = self._completion_record(request, task_id, correlation_id, deferred=deferred)
        record.finalizer = self.finalizer
        record.context = context
        if context.prefix_chain and not deferred and isinstance(request, TaskRequest):
            record.prefix_hit_tokens = core.prefix.admit(context.prefix_chain, len(request.prompt.encode()),
                                                         record.prompt_tokens)
            # kv_warmth: this pool probably holds part of the prompt (not only "same pool as last turn").
            record.context = replace(context, kv_warmth=record.prefix_hit_tokens > 0)
        record.bind_loop(core.loop)
        try:
            outcome = core.queue.enqueue(task_id, request.priority, record, tenant=context.tenant,
                                         weight=context.weight)
        except QueueFullError as exc:
            raise self._backpressure(exc) from None
        record.queue_position = outcome.position
        record.predicted_start_ms = predicted_start_ms(core, outcome.position)
        core.tasks[task_id] = record
        core.counts.enqueued(record.priority)
        if outcome.dropped is not None:
            self._drop(outcome.dropped)
        core.wake()
        admission = results.admitted(task_id, core.pool_id, outcome.position, record.predicted_start_ms,
                                     backoff_ms(core), record.prompt_tokens, record.params.seed,
                                     core.preparation, deferred=deferred)
        if deferred:
            core.deferred[task_id] = request
            self.push_frame(record, time.monotonic())
        return admission

    def _check_open(self, request: Request, task_id: str) -> bool:
        """Refuse what the pool cannot take now; True: queue it unchecked until the model is loaded."""
        core = self.core
        deferred = False
        if not core.life.ready or core.engine is None:
            if core.engine is None and not core.draining and core.life.held != bindings.RETIRED \
                    and bindings.accepts_tasks(core.preparation):
                deferred = True  # queued now, checked and run once the model is loaded
            else:
                raise self._unready()
        if core.draining:
            raise self._refusal(ErrorCode.POOL_UNREADY, f"pool '{core.pool_id}' is draining and admits no new work",
                                retriable=True, retry_after_ms=RETRY_AFTER_MS)
        if task_id in core.tasks:
            raise OrchError(ErrorCode.INVALID_PARAMS, f"task_id '{task_id}' is already in use; pick another or leave it out")
        if deferred and isinstance(request, EmbeddingRequest):
            raise self._refusal(ErrorCode.POOL_UNREADY, f"pool '{core.pool_id}' is preparing its model; embeddings "
                                "are admitted once it is Ready", retriable=True, retry_after_ms=RETRY_AFTER_MS)
        return deferred

    def _refusal(self, code: ErrorCode, message: str, **fields: Any) -> OrchError:
        return OrchError(code, message, pool_id=self.core.pool_id, engine=self.core.engine_name, **fields)

    def _completion_record(self, request: TaskRequest, task_id: str, correlation_id: Optional[str],
                           deferred: bool = False) -> TaskRecord:
        core = self.core
        engine_features.check(engine_features.variant(core.engine_name, core.config.engine_options), request,
                              core.pool_id)
        if deferred:  # no tokenizer yet: what the config alone can tell now, the rest once loaded
            if core.config.ctx is not None or core.config.max_tokens_out is not None:
                check_request(request, ModelLimits(ctx_max=core.config.ctx or 16_777_216,
                                                   max_tokens_out=core.config.max_tokens_out))
            ctx, prompt_tokens = request.ctx or 0, 0
        else:
            ctx = check_request(request, core.limits())
            prompt_tokens = core.engine.count_tokens(request.prompt)
            check_context(prompt_tokens, request.max_tokens, ctx)
        return TaskRecord(task_id=task_id, priority=request.priority.value, prompt=request.prompt,
                          ctx=ctx, prompt_tokens=prompt_tokens, queue_position=0, predicted_start_ms=0,
                          deadline_at=_deadline_at(request), session_id=request.session_id,
                          correlation_id=correlation_id, request=request.model_dump(mode="json", exclude_none=True),
                          params=generation_params(request))

    def _embedding_record(self, request: EmbeddingRequest, task_id: str, correlation_id: Optional[str]) -> TaskRecord:
        engine = self.core.engine
        if not engine.serves_embeddings:
            raise self._refusal(ErrorCode.INVALID_PARAMS, f"pool '{self.core.pool_id}' does not serve embeddings")
        ctx = engine.ctx_max
        counts = [engine.count_tokens(text) for text in request.inputs]
        for index, count in enumerate(counts):
            if count > ctx:
                raise self._refusal(ErrorCode.INVALID_PARAMS, f"input[{index}] is {count} tokens; the model "
                                    f"embeds at most {ctx} tokens per input")
        return TaskRecord(task_id=task_id, priority=request.priority.value, prompt="",
                          params=GenerationParams(max_tokens=1, seed=0), ctx=ctx, prompt_tokens=sum(counts),
                          queue_position=0, predicted_start_ms=0, deadline_at=_deadline_at(request),
                          session_id=request.session_id, correlation_id=correlation_id, inputs=list(request.inputs),
                          request=request.model_dump(mode="json", exclude_none=True))

    def _unready(self) -> OrchError:
        core = self.core
        cause = f": {core.last_error}" if core.last_error else " (still loading)"
        if core.preparation is not None and core.preparation.get("reason") and not core.life.held == bindings.RETIRED:
            cause = f": {core.last_error or 'preparing its model'}; {core.preparation['reason']}"
        return self._refusal(ErrorCode.POOL_UNREADY, f"pool '{core.pool_id}' is not Ready{cause}", retriable=True,
                             retry_after_ms=RETRY_AFTER_MS)

    def _backpressure(self, exc: QueueFullError) -> OrchError:
        retry_ms = max(100, int(self.core.per_slot_ms()))
        return self._refusal(ErrorCode.ADMISSION_REJECT, f"pool '{self.core.pool_id}' queue is full "
                             f"({exc.capacity} tasks); retry after {retry_ms} ms", retriable=True,
                             retry_after_ms=retry_ms, policy_label=exc.policy.value)

    def _drop(self, task_id: str) -> None:
        core = self.core
        record = core.tasks.get(task_id)
        if record is None:
            return
        core.counts.add("dropped")
        core.metrics.backpressure.inc(core.queue.policy.value)
        record.push("error", core.error_payload(
            ErrorCode.QUEUE_FULL_DROP_LRU,
            f"dropped from the full queue of pool '{core.pool_id}' to make room for newer work (policy drop-lru)",
            retriable=True, retry_after_ms=max(100, int(core.per_slot_ms()))))

    def admit_deferred(self) -> None:
        """The checks that needed the model, for the tasks queued before it was loaded; a task
        that does not fit ends now with the typed error admission would have given it."""
        core = self.core
        deferred, core.deferred = core.deferred, {}
        for task_id, request in deferred.items():
            record = core.tasks.get(task_id)
            if record is None or record.terminal or record.state != "queued":
                continue
            try:
                ctx = check_request(request, core.limits())
                prompt_tokens = core.engine.count_tokens(request.prompt)
                check_context(prompt_tokens, request.max_tokens, ctx)
            except OrchError as exc:
                core.queue.cancel(task_id)
                record.cancelled = True
                core.counts.rejected(exc.code.value)
                record.push("error", core.error_payload(
                    exc.code, f"{exc.message} (checked once the model was loaded)", retriable=exc.retriable))
                continue
            record.ctx, record.prompt_tokens = ctx, prompt_tokens


def generation_params(request: TaskRequest) -> GenerationParams:
    """What the engine is asked for; a seed the request left out is drawn here."""
    return GenerationParams(
        max_tokens=request.max_tokens,
        seed=request.seed if request.seed is not None else random.getrandbits(32),
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        stop=tuple(request.stop),
        reuse_prefix=request.kv_hint != KVHint.cold and request.determinism != DeterminismLevel.strict,
        repetition_penalty=request.repetition_penalty,
        min_p=request.min_p,
        ignore_eos=request.ignore_eos,
        strict=request.determinism == DeterminismLevel.strict,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        typical_p=request.typical_p,
        logit_bias=request.bias_pairs(),
        min_tokens=request.min_tokens,
        logprobs=request.logprobs,
        prompt_logprobs=request.prompt_logprobs,
        json_schema=request.json_schema,
        grammar=request.grammar,
    )


def _deadline_at(request: Request) -> Optional[float]:
    return time.monotonic() + request.deadline_ms / 1000 if request.deadline_ms else None
