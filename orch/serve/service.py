"""What every task-creating route shares: sessions, placement, admission, streams, cancel.

``/v2/tasks`` and the OpenAI-compatible routes both go through ``TaskService``, so no route
bypasses budgets, placement or the pools' bounded queues.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol, Union

import ray

from orch.api.errors import ErrorCode
from orch.api.tasks import EmbeddingRequest, PlacementMode, PlacementOverrides, TaskRequest
from orch.core.errors import OrchError
from orch.core.placement import PlacementDecision, PoolView, place
from orch.observability.ingress_metrics import IngressCounters
from orch.observability.logs import bind
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

    def context_on(self, pool_id: str) -> dict[str, Any]:
        """What the pool shows in the task's metrics frames (ids and numbers only)."""
        return {"kv_warmth": self.last_pool_id == pool_id, "budgets": self.budgets, "prices": self.prices}


class SessionGate(Protocol):
    """Sessions as admission sees them (implemented over the shared sessions actor)."""

    async def before_admit(self, session_id: str, request: AnyTask) -> SessionTurn:
        """Check the session's turns and budgets (raise OrchError BUDGET_EXCEEDED to
        refuse); returns where its last turn ran, for affinity, and its budgets left."""

    async def after_admit(self, session_id: str, pool_id: str, decision: PlacementDecision) -> None:
        """Record the turn and where it went."""


class PreparationError(OrchError):
    """POOL_UNREADY from a pool that waits for its model, with the plan that would make it
    present (the error body's ``preparation``)."""

    def __init__(self, error: OrchError, preparation: dict[str, Any]) -> None:
        super().__init__(error.code, error.message, retriable=error.retriable, retry_after_ms=error.retry_after_ms,
                         pool_id=error.pool_id, engine=error.engine, policy_label=error.policy_label)
        self.preparation = preparation

    def to_dict(self) -> dict[str, Any]:
        return dict(super().to_dict(), preparation=self.preparation)


@dataclass
class Admitted:
    task_id: str
    pool_id: str
    decision: PlacementDecision
    result: dict[str, Any]


class TaskService:
    def __init__(
        self, registry: PoolRegistry, sessions: Optional[SessionGate] = None, counters: Optional[IngressCounters] = None
    ) -> None:
        self.registry = registry
        self.sessions = sessions
        self.counters = counters or IngressCounters()

    async def admit(self, task: AnyTask, correlation_id: Optional[str] = None) -> Admitted:
        """Budgets, placement and the pool's admission, in that order; raises OrchError."""
        task_id = task.task_id or uuid.uuid4().hex
        bind(task_id=task_id, session_id=task.session_id)
        session_pool_id = None
        turn: Optional[SessionTurn] = None
        if task.session_id and self.sessions is not None:
            turn = await self.sessions.before_admit(task.session_id, task)
            session_pool_id = turn.last_pool_id
        views = await self.registry.views()
        try:
            decision = place(
                views,
                engine=task.engine.value if task.engine else None,
                model_ref=task.model_ref,
                overrides=task.placement,
                session_pool_id=session_pool_id,
                workload=task.workload.value,
            )
        except OrchError as exc:
            waiting = _preparing_pool(views, await self.registry.rows(), task) \
                if exc.code == ErrorCode.POOL_UNREADY else None
            if waiting is None:
                self.counters.refused(exc.code.value, pinned=bool(task.placement and task.placement.pin_pool_id))
                raise
            decision = waiting
        self.counters.placed(decision)
        log.info("placed on %s", decision.pool_id, extra={
            "pool_id": decision.pool_id, "session_id": task.session_id,
            "human": _placement_sentence(decision)})
        bind(pool_id=decision.pool_id)
        try:
            context = turn.context_on(decision.pool_id) if turn is not None else None
            result = await self.registry.handle(decision.pool_id).submit.remote(task, task_id, correlation_id, context)
        except ray.exceptions.RayActorError:
            self.registry.forget(decision.pool_id)
            raise OrchError(
                ErrorCode.POOL_UNAVAILABLE,
                f"pool '{decision.pool_id}' is unreachable; retry shortly",
                retriable=True,
                retry_after_ms=1000,
                pool_id=decision.pool_id,
            ) from None
        if "error" in result:
            error = OrchError.from_dict(result["error"])
            if result["error"].get("preparation") is not None:
                raise PreparationError(error, result["error"]["preparation"])
            raise error
        self.registry.remember(task_id, decision.pool_id)
        self.registry.note_admitted(decision.pool_id)
        log.info("admitted at position %d", result["queue_position"], extra={
            "human": _admission_sentence(decision.pool_id, result)})
        if task.session_id and self.sessions is not None:
            await self.sessions.after_admit(task.session_id, decision.pool_id, decision)
        return Admitted(task_id, decision.pool_id, decision, result)

    async def locate(self, task_id: str) -> str:
        pool_id = await self.registry.locate(task_id)
        if pool_id is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}' (unknown, or finished and expired)")
        return pool_id

    async def open_stream(self, task_id: str, cursor: int = 0) -> "TaskStream":
        """Attach to a task's events from ``cursor``; raises NOT_FOUND before any byte is sent."""
        pool_id = await self.locate(task_id)
        stream = TaskStream(self.registry.handle(pool_id), task_id, pool_id, cursor)
        first = await stream.poll(0.0)
        if "error" in first:
            raise OrchError.from_dict(first["error"])
        stream.first = first
        return stream

    async def cancel(self, task_id: str) -> dict[str, Any]:
        pool_id = await self.locate(task_id)
        try:
            result = await self.registry.handle(pool_id).cancel.remote(task_id)
        except ray.exceptions.RayActorError:
            raise OrchError(ErrorCode.WORKER_RESET, f"pool '{pool_id}' was lost; the task is gone",
                            retriable=True, pool_id=pool_id) from None
        if not result.get("found"):
            raise OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}'")
        return result


def _preparing_pool(views: list[PoolView], rows: dict[str, dict[str, Any]], task: AnyTask) -> Optional[PlacementDecision]:
    """A pool that holds for the model this task asks for (waiting for it, or retired), when no
    Ready pool can take it: placement never picks a pool that is not Ready, but such a pool
    answers with its preparation plan, queuing the task while its model is fetched."""
    overrides = task.placement or PlacementOverrides()
    engine = task.engine.value if task.engine else None
    pin = overrides.pin_pool_id if overrides.mode == PlacementMode.pin else None
    found = []
    for view in views:
        row = rows.get(view.pool_id, {})
        if not (row.get("waiting_for_model") or row.get("model_retired")) or view.draining:
            continue
        if (pin is not None and not view.named([pin])) or view.named(overrides.avoid_pools):
            continue
        if not view.serves(engine, task.model_ref, task.workload.value):
            continue
        if overrides.require_device_mask is not None and view.device_mask != overrides.require_device_mask:
            continue
        if overrides.prefer_pools and not overrides.allow_fallback and not view.named(overrides.prefer_pools):
            continue
        found.append(view)
    if not found:
        return None
    chosen = min(found, key=lambda view: (view.queue_depth, view.pool_id))
    return PlacementDecision(chosen.pool_id, pinned=pin is not None, candidates_considered=len(found))


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


def _admission_sentence(pool_id: str, result: dict[str, Any]) -> str:
    position = result["queue_position"]
    if position == 0 and result["predicted_start_ms"] == 0:
        return f"Accepted by pool {pool_id}; it starts right away."
    return (f"Accepted by pool {pool_id} with {position} task(s) ahead; "
            f"expected to start in about {result['predicted_start_ms']} ms.")


class TaskStream:
    """A task's events, relayed in batches: everything ready since the last hop, one call."""

    def __init__(self, handle, task_id: str, pool_id: str, cursor: int) -> None:
        self.handle = handle
        self.task_id = task_id
        self.pool_id = pool_id
        self.cursor = cursor
        self.first: Optional[dict[str, Any]] = None

    async def poll(self, wait_s: float) -> dict[str, Any]:
        try:
            return await self.handle.poll.remote(self.task_id, self.cursor, wait_s)
        except ray.exceptions.RayActorError:
            return {
                "events": [(self.cursor, "error", {
                    "code": ErrorCode.WORKER_RESET.value,
                    "message": f"pool '{self.pool_id}' was lost while serving this task; resubmit it",
                    "retriable": True,
                    "pool_id": self.pool_id,
                })],
                "done": True,
            }

    async def batches(self) -> AsyncIterator[list[tuple[int, str, dict[str, Any]]]]:
        """Yields event batches; an empty batch means 'still running, nothing new' (keepalive)."""
        result = self.first if self.first is not None else await self.poll(0.0)
        first = True
        while True:
            if "error" in result:  # the task expired between polls
                yield [(self.cursor, "error", result["error"])]
                return
            events = result["events"]
            if events:
                self.cursor = events[-1][0] + 1
                yield events
            elif not result["done"] and not first:
                yield []
            if result["done"]:
                return
            first = False
            result = await self.poll(POLL_WAIT_S)
