"""What every task-creating route shares: sessions, placement, admission, streams, cancel.

``/v2/tasks`` and the OpenAI-compatible routes both go through ``TaskService``, so no route
bypasses budgets, placement or the pools' bounded queues.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Optional, Protocol, Union

from orch.api.errors import ErrorCode
from orch.api.events import SSEError
from orch.api.pools import Admission, CancelResult, PollResult, PoolView, TaskContext, TaskEvent
from orch.api.tasks import EmbeddingRequest, TaskRequest
from orch.core.errors import OrchError
from orch.core.placement import PlacementDecision, Prompt, place, preparing_pool
from orch.core.prefix import block_hashes, pack, salt_for
from orch.observability.ingress_metrics import IngressCounters
from orch.observability.logs import bind
from orch.observability.series import LiveSeries
from orch.observability.trace import RequestTrace, Traces, received_at
from orch.serve.limits import TenantLimits
from orch.serve.pool_client import PoolClient, PoolLost, PoolNotRunning, raised
from orch.serve.registry import PoolRegistry
from orch.tenants.access import admit_as, current_principal, tenant_context

log = logging.getLogger("orch.ingress")

#: Seconds one poll of a pool waits for new events before the stream sends a keepalive.
POLL_WAIT_S = 15.0
#: A stream opened this soon after this replica admitted its task skips the existence check
#: (one Ray call): the pool has the task, or ended it with an event the stream will carry.
KNOWN_FRESH_S = 10.0

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
        self, registry: PoolRegistry, sessions: Optional[SessionGate] = None, counters: Optional[IngressCounters] = None,
        series: Optional[LiveSeries] = None,
    ) -> None:
        self.registry = registry
        self.pools = registry.pools
        self.sessions = sessions
        self.counters = counters or IngressCounters()
        #: The status page's live charts (tokens relayed, first-token times).
        self.series = series or LiveSeries()
        #: The newest requests' hop marks (orch/observability/trace.py).
        self.traces = Traces()
        self.policy = registry.config.server.placement
        self._salt = salt_for(registry.config.namespace)
        self._turns = itertools.count()
        #: Per-key limits (orch/serve/limits.py): one limiter call per admission with a key.
        self.limits = TenantLimits(registry.config, registry.pools)

    async def admit(self, task: AnyTask, correlation_id: Optional[str] = None) -> Admitted:
        """Access, the key's limits, budgets, placement and the pool's admission, in that
        order; raises OrchError. What the limits reserved is given back when a later step
        refuses the task (the pool settles it once admitted)."""
        principal = current_principal()
        task = admit_as(principal, task)
        task_id = task.task_id or uuid.uuid4().hex
        trace = RequestTrace(task_id, received_at(), parsed_at=time.monotonic())
        bind(task_id=task_id, session_id=task.session_id)
        held_by = await self.limits.admit(principal, task, task_id)
        try:
            decision, admission = await self._enqueue(task, task_id, correlation_id, trace, held_by)
        except BaseException as exc:
            if held_by is not None:
                self.limits.release(task_id, exc)
            raise
        if task.session_id and self.sessions is not None:
            await self.sessions.after_admit(task.session_id, decision.pool_id)
        return Admitted(task_id, decision.pool_id, decision, admission)

    async def _enqueue(self, task: AnyTask, task_id: str, correlation_id: Optional[str], trace: RequestTrace,
                       held_by: Optional[str]) -> tuple[PlacementDecision, Admission]:
        """The session's turn, placement and the pool's admission."""
        turn: Optional[SessionTurn] = None
        if task.session_id and self.sessions is not None:
            turn = await self.sessions.before_admit(task.session_id, task)
        prompt = self._prompt(task)
        decision = await self._placed(task, turn.last_pool_id if turn else None, prompt)
        self.counters.placed(decision)
        log.info("placed on %s", decision.pool_id, extra={
            "pool_id": decision.pool_id, "session_id": task.session_id,
            "human": _placement_sentence(decision)})
        bind(pool_id=decision.pool_id)
        context = turn.context_on(decision.pool_id) if turn is not None else None
        if prompt.chain or decision.alternatives:
            context = replace(context or TaskContext(), prefix_chain=prompt.chain, placement=decision.explain())
        context = tenant_context(context, current_principal())
        if held_by is not None:  # the pool settles the reservation when the task ends
            context = replace(context or TaskContext(), key_id=held_by)
        trace.placed_at = time.monotonic()
        # Counted before the submit's await: requests placed meanwhile see this one.
        self.registry.note_admitted(decision.pool_id, pack(prompt.chain), task_id)
        try:
            admission = await self.pools.submit(decision.pool_id, task, task_id, correlation_id, context)
        except PoolLost:
            self.registry.forget(decision.pool_id)
            self.registry.invalidate()
            raise
        except PoolNotRunning:
            self.registry.invalidate()
            raise
        trace.admitted_at = time.monotonic()
        self.traces.add(trace)
        self.registry.remember(task_id, decision.pool_id)
        log.info("admitted at position %d", admission.queue_position, extra={
            "human": _admission_sentence(decision.pool_id, admission)})
        return decision, admission

    def _prompt(self, task: AnyTask) -> Prompt:
        """The prompt's block hashes (prefix-aware placement; the pool records them as cached)."""
        chain = block_hashes(task.prompt, self._salt) if isinstance(task, TaskRequest) else ()
        return Prompt(chain, self.policy, next(self._turns))

    async def _placed(self, task: AnyTask, session_pool_id: Optional[str], prompt: Prompt) -> PlacementDecision:
        """Placement on the views as this replica last saw them (no wait while they are
        young); a refusal from views older than the registry's ttl is checked once more
        against views asked for now, so a pool that came back since is not refused."""
        await self.registry.ensure_model(task.model_ref)  # a cold model of the set starts loading
        views = await self.registry.views()
        try:
            return self._place(task, views, session_pool_id, prompt, count_refusal=False)
        except OrchError:
            if self.registry.age_s() <= self.registry.ttl_s:
                return self._place(task, views, session_pool_id, prompt)
        return self._place(task, list((await self.registry.rows()).values()), session_pool_id, prompt)

    def _place(self, task: AnyTask, views: list[PoolView], session_pool_id: Optional[str],
               prompt: Optional[Prompt] = None, count_refusal: bool = True) -> PlacementDecision:
        """A Ready pool, or else one preparing the task's model (it queues the task and answers
        with its preparation plan); refusals are counted unless ``count_refusal`` is off."""
        wanted = dict(engine=task.engine.value if task.engine else None, model_ref=task.model_ref,
                      overrides=task.placement, workload=task.workload.value)
        try:
            return place(views, session_pool_id=session_pool_id, prompt=prompt, **wanted)
        except OrchError as exc:
            waiting = preparing_pool(views, **wanted) if exc.code == ErrorCode.POOL_UNREADY else None
            if waiting is None:
                if count_refusal:
                    self.counters.refused(exc.code.value,
                                          pinned=bool(task.placement and task.placement.pin_pool_id))
                raise
            return waiting

    async def locate(self, task_id: str) -> str:
        pool_id = await self.registry.locate(task_id)
        if pool_id is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}' (unknown, or finished and expired)")
        return pool_id

    async def open_stream(self, task_id: str, cursor: int = 0) -> "TaskStream":
        """Attach to a task's events from ``cursor``; raises NOT_FOUND before any byte is sent.

        A task this replica admitted moments ago needs no check: the stream's first call is
        then the long poll that waits for its events."""
        pool_id = await self.locate(task_id)
        trace = self.traces.get(task_id) if cursor == 0 else None
        if trace is not None and trace.pool is None:
            now = received_at()
            if now != trace.received_at:  # a second request (GET .../events) streams it
                trace.stream_received_at = now
            if trace.admitted_at is not None and now - trace.admitted_at < KNOWN_FRESH_S:
                return self._stream(task_id, pool_id, cursor, trace)
        stream = self._stream(task_id, pool_id, cursor, trace)
        first = await stream.poll(0.0)
        if first.error is not None:
            raise raised(first.error)
        stream.first = first
        return stream

    def _stream(self, task_id: str, pool_id: str, cursor: int, trace: Optional[RequestTrace]) -> "TaskStream":
        stream = TaskStream(self.pools, task_id, pool_id, cursor, trace, self.counters, self.series)
        stream.on_done = lambda: self.registry.note_finished(task_id, pool_id)
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
    if decision.reason == "prefix_overlap":
        return (f"Placed on pool {decision.pool_id}, which probably holds {decision.overlap_tokens} tokens of the "
                f"prompt already (prefill saved outweighs its wait).")
    if decision.reason == "round_robin":
        return f"Placed on pool {decision.pool_id}, next in turn of {decision.candidates_considered} ready pools."
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

    def __init__(self, pools: PoolClient, task_id: str, pool_id: str, cursor: int,
                 trace: Optional[RequestTrace] = None, counters: Optional[IngressCounters] = None,
                 series: Optional[LiveSeries] = None) -> None:
        self.pools = pools
        self.task_id = task_id
        self.pool_id = pool_id
        self.cursor = cursor
        self.first: Optional[PollResult] = None
        self.trace = trace
        self.counters = counters
        self.series = series
        self._relaying_first = False
        #: The task has sent an output token: its polls go with the pool's other running
        #: streams, in rounds at most every ``stream_interval_ms`` (so its first token never
        #: waits on that interval).
        self.running = False
        #: The consumer wants the whole answer, not its steps (a non-streaming request): each
        #: poll waits for the task's end, one Ray call per task instead of one per page.
        self.whole = False
        #: Called once the task is done (the registry stops counting it in its cached row).
        self.on_done: Optional[Callable[[], None]] = None

    async def poll(self, wait_s: float) -> PollResult:
        result = await self.pools.poll(self.pool_id, self.task_id, self.cursor, wait_s, together=self.running,
                                       until_done=self.whole)
        if not self.running and any(event[1] == "token" and "prompt_logprobs" not in event[2]
                                    for event in result.events):
            self.running = True
        trace = self.trace
        if result.marks is not None and trace is not None and trace.pool is None:
            trace.pool, trace.page_received_at = result.marks, time.monotonic()
            self._relaying_first = True
        return result

    def _relayed(self) -> None:
        """The page with the first token goes to the route that writes it: the trace's last
        mark, and its split. (Marked as it is handed over, not once written: a consumer
        may stop reading after its last page, and writing is the next hop's time.)"""
        self._relaying_first = False
        trace = self.trace
        trace.relayed_at = time.monotonic()
        parts = trace.split_ms()
        if parts is None:
            return
        if self.counters is not None:
            self.counters.first_token_split(parts)
        if self.series is not None:
            self.series.first_token(self.pool_id, sum(parts.values()))

    async def batches(self) -> AsyncIterator[list[TaskEvent]]:
        """Yields event batches; an empty batch means 'still running, nothing new' (keepalive).

        Without a first page from ``open_stream``, the first call already waits for events
        (a long poll), so a first token never waits for a second round trip."""
        first = self.first is not None
        result = self.first if first else await self.poll(POLL_WAIT_S)
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
                if self.series is not None:
                    self.series.tokens(self.pool_id, sum(1 for event in events if event[1] == "token"))
                if self._relaying_first:
                    self._relayed()
                yield list(events)
            elif not result.done and not first:
                yield []
            if result.done:
                if self.on_done is not None:
                    self.on_done()
                return
            first = False
            result = await self.poll(POLL_WAIT_S)
