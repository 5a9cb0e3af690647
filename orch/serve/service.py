"""What every task-creating route shares: sessions, placement, admission, streams, cancel.

``/v2/tasks`` and the OpenAI-compatible routes both go through ``TaskService``, so no route
bypasses budgets, placement or the pools' bounded queues.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol, Union

from orch.api.errors import ErrorCode
from orch.api.events import SSEError
from orch.api.pools import Admission, CancelResult, PollResult, PoolView, TaskContext, TaskEvent
from orch.api.tasks import EmbeddingRequest, TaskRequest
from orch.core.errors import OrchError
from orch.core.placement import PlacementDecision, place, preparing_pool
from orch.observability.ingress_metrics import IngressCounters
from orch.observability.logs import bind
from orch.serve.pool_client import PoolClient, PoolLost, raised
from orch.serve.registry import PoolRegistry

log = logging.getLogger("orch.ingress")

#: Seconds one poll of a pool waits for new events before the stream sends a keepalive.
POLL_WAIT_S = 15.0

AnyTask = Union[TaskRequest, EmbeddingRequest]


@dataclass
class SessionTurn:
    """A session's answer to one more turn: where its last turn ran (affinity) and what it
    may still spend (None without budgets; prices per 1k tokens for the cost budget)."""

    last_pool_id: Optional[str]
    budgets: Optional[dict[str, Any]] = None
    prices: Optional[dict[str, float]] = None

    def context_on(self, pool_id: str) -> TaskContext:
        """What the pool shows in the task's metrics frames (ids and numbers only)."""
        return TaskContext(kv_warmth=self.last_pool_id == pool_id, budgets=self.budgets, prices=self.prices)


class SessionGate(Protocol):
    """Sessions as admission sees them (implemented over the shared sessions actor)."""

    async def before_admit(self, session_id: str, request: AnyTask) -> SessionTurn:
        """Check the session's turns and budgets (raise OrchError BUDGET_EXCEEDED to
        refuse); returns where its last turn ran, for affinity, and its budgets left."""

    async def after_admit(self, session_id: str, pool_id: str) -> None:
        """Record the turn and where it went."""


@dataclass
class Admitted:
    task_id: str
    pool_id: str
    decision: PlacementDecision
    result: Admission


class TaskService:
    def __init__(
        self, registry: PoolRegistry, sessions: Optional[SessionGate] = None, counters: Optional[IngressCounters] = None
    ) -> None:
        self.registry = registry
        self.pools = registry.pools
        self.sessions = sessions
        self.counters = counters or IngressCounters()

    async def admit(self, task: AnyTask, correlation_id: Optional[str] = None) -> Admitted:
        """Budgets, placement and the pool's admission, in that order; raises OrchError."""
        task_id = task.task_id or uuid.uuid4().hex
        bind(task_id=task_id, session_id=task.session_id)
        turn: Optional[SessionTurn] = None
        if task.session_id and self.sessions is not None:
            turn = await self.sessions.before_admit(task.session_id, task)
        decision = self._place(task, await self.registry.views(), turn.last_pool_id if turn else None)
        self.counters.placed(decision)
        log.info("placed on %s", decision.pool_id, extra={
            "pool_id": decision.pool_id, "session_id": task.session_id,
            "human": _placement_sentence(decision)})
        bind(pool_id=decision.pool_id)
        context = turn.context_on(decision.pool_id) if turn is not None else None
        try:
            admission = await self.pools.submit(decision.pool_id, task, task_id, correlation_id, context)
        except PoolLost:
            self.registry.forget(decision.pool_id)
            raise
        self.registry.remember(task_id, decision.pool_id)
        self.registry.note_admitted(decision.pool_id)
        log.info("admitted at position %d", admission.queue_position, extra={
            "human": _admission_sentence(decision.pool_id, admission)})
        if task.session_id and self.sessions is not None:
            await self.sessions.after_admit(task.session_id, decision.pool_id)
        return Admitted(task_id, decision.pool_id, decision, admission)

    def _place(self, task: AnyTask, views: list[PoolView], session_pool_id: Optional[str]) -> PlacementDecision:
        """A Ready pool, or else one preparing the task's model (it queues the task and answers
        with its preparation plan); refusals are counted."""
        wanted = dict(engine=task.engine.value if task.engine else None, model_ref=task.model_ref,
                      overrides=task.placement, workload=task.workload.value)
        try:
            return place(views, session_pool_id=session_pool_id, **wanted)
        except OrchError as exc:
            waiting = preparing_pool(views, **wanted) if exc.code == ErrorCode.POOL_UNREADY else None
            if waiting is None:
                self.counters.refused(exc.code.value, pinned=bool(task.placement and task.placement.pin_pool_id))
                raise
            return waiting

    async def locate(self, task_id: str) -> str:
        pool_id = await self.registry.locate(task_id)
        if pool_id is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}' (unknown, or finished and expired)")
        return pool_id

    async def open_stream(self, task_id: str, cursor: int = 0) -> "TaskStream":
        """Attach to a task's events from ``cursor``; raises NOT_FOUND before any byte is sent."""
        pool_id = await self.locate(task_id)
        stream = TaskStream(self.pools, task_id, pool_id, cursor)
        first = await stream.poll(0.0)
        if first.error is not None:
            raise raised(first.error)
        stream.first = first
        return stream

    async def cancel(self, task_id: str) -> CancelResult:
        pool_id = await self.locate(task_id)
        result = await self.pools.cancel(pool_id, task_id)
        if not result.found:
            raise OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}'")
        return result


def _placement_sentence(decision: PlacementDecision) -> str:
    if decision.pinned:
        return f"Sent to pool {decision.pool_id}, as the request pinned it."
    if decision.session_affinity:
        return f"Kept on pool {decision.pool_id}, where this session's last turn ran."
    if decision.fallback:
        return f"None of the preferred pools could take it, so it went to pool {decision.pool_id}."
    others = decision.candidates_considered - 1
    if others <= 0:
        return f"Placed on pool {decision.pool_id}, the only pool able to take it."
    return f"Placed on pool {decision.pool_id}, the least busy of {decision.candidates_considered} ready pools."


def _admission_sentence(pool_id: str, admission: Admission) -> str:
    position = admission.queue_position
    if position == 0 and admission.predicted_start_ms == 0:
        return f"Accepted by pool {pool_id}; it starts right away."
    return (f"Accepted by pool {pool_id} with {position} task(s) ahead; "
            f"expected to start in about {admission.predicted_start_ms} ms.")


class TaskStream:
    """A task's events, relayed in batches: everything ready since the last hop, one call."""

    def __init__(self, pools: PoolClient, task_id: str, pool_id: str, cursor: int) -> None:
        self.pools = pools
        self.task_id = task_id
        self.pool_id = pool_id
        self.cursor = cursor
        self.first: Optional[PollResult] = None

    async def poll(self, wait_s: float) -> PollResult:
        return await self.pools.poll(self.pool_id, self.task_id, self.cursor, wait_s)

    async def batches(self) -> AsyncIterator[list[TaskEvent]]:
        """Yields event batches; an empty batch means 'still running, nothing new' (keepalive)."""
        result = self.first if self.first is not None else await self.poll(0.0)
        first = True
        while True:
            if result.error is not None:  # the task expired between polls
                error = result.error
                yield [(self.cursor, "error", SSEError(
                    code=error.code, message=error.message, retriable=error.retriable,
                    retry_after_ms=error.retry_after_ms, engine=error.engine, pool_id=error.pool_id).payload())]
                return
            events = result.events
            if events:
                self.cursor = events[-1][0] + 1
                yield list(events)
            elif not result.done and not first:
                yield []
            if result.done:
                return
            first = False
            result = await self.poll(POLL_WAIT_S)
