"""The ingress's one way to call pool actors.

Every Ray failure is turned into an ``OrchError`` here, once: a pool whose actor is not
there (yet) or died answers POOL_UNAVAILABLE, one that does not answer in time too, and a
pool lost under a running task ends its stream with WORKER_RESET. A cached handle to an
actor the supervisor replaced is looked up again by name once (idempotent reads only: a
submit or cancel is never sent twice).
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence, Union

import ray

from orch.actors import ActorClient
from orch.api.errors import ErrorCode
from orch.api.events import SSEError
from orch.api.pools import (
    Admission,
    CancelResult,
    PollResult,
    PoolDetail,
    PoolError,
    PoolSnapshot,
    PoolView,
    SubmitResult,
    TaskContext,
)
from orch.api.tasks import EmbeddingRequest, TaskRequest
from orch.core.errors import OrchError
from orch.pools.actor import pool_handle
from orch.serve.poll_mux import PollMux


class PreparationError(OrchError):
    """POOL_UNREADY from a pool that waits for its model, with the plan that would make it
    present (the error body's ``preparation``)."""

    def __init__(self, error: OrchError, preparation: dict[str, Any]) -> None:
        super().__init__(error.code, error.message, retriable=error.retriable, retry_after_ms=error.retry_after_ms,
                         pool_id=error.pool_id, engine=error.engine, policy_label=error.policy_label)
        self.preparation = preparation

    def to_dict(self) -> dict[str, Any]:
        return dict(super().to_dict(), preparation=self.preparation)


def raised(error: PoolError) -> OrchError:
    """The exception a pool's error envelope stands for."""
    exc = OrchError(ErrorCode(error.code), error.message, retriable=error.retriable,
                    retry_after_ms=error.retry_after_ms, pool_id=error.pool_id, engine=error.engine,
                    policy_label=error.policy_label)
    return PreparationError(exc, error.preparation) if error.preparation is not None else exc


def unavailable(pool_id: str, why: str) -> OrchError:
    return OrchError(ErrorCode.POOL_UNAVAILABLE, f"pool '{pool_id}' {why}", retriable=True, retry_after_ms=1000,
                     pool_id=pool_id)


class PoolLost(OrchError):
    """The pool's actor died under the call (what it held, queued or running, is gone)."""

    def __init__(self, pool_id: str, cause: BaseException) -> None:
        super().__init__(ErrorCode.POOL_UNAVAILABLE, f"pool '{pool_id}' is unreachable; retry shortly",
                         retriable=True, retry_after_ms=1000, pool_id=pool_id)
        self.cause = type(cause).__name__


class PoolNotRunning(OrchError):
    """No actor of the pool's name (yet): its supervisor is starting or restarting it."""

    def __init__(self, pool_id: str) -> None:
        super().__init__(ErrorCode.POOL_UNAVAILABLE,
                         f"pool '{pool_id}' is being (re)started by its supervisor; retry shortly",
                         retriable=True, retry_after_ms=1000, pool_id=pool_id)


class PoolClient:
    """Handles to the pool actors of one namespace, looked up by name and cached."""

    def __init__(self, namespace: str, handles: Optional[dict[str, Any]] = None,
                 stream_interval_s: float = 0.0) -> None:
        """``stream_interval_s``: the least time between two rounds of a pool's running
        streams' polls, so that several tokens go in one page (``stream_interval_ms``)."""
        self.namespace = namespace
        self.stream_interval_s = stream_interval_s
        self._clients: dict[str, ActorClient] = {}
        self._muxes: dict[str, PollMux] = {}
        for pool_id, handle in (handles or {}).items():
            self._client(pool_id).handle = handle

    def _client(self, pool_id: str) -> ActorClient:
        client = self._clients.get(pool_id)
        if client is None:
            client = ActorClient(lambda: pool_handle(pool_id, self.namespace))
            self._clients[pool_id] = client
        return client

    def handle(self, pool_id: str):
        """The cached handle, looked up now when there is none (blocking, quick)."""
        client = self._client(pool_id)
        if client.handle is None:
            try:
                client.handle = pool_handle(pool_id, self.namespace)
            except ValueError:
                raise PoolNotRunning(pool_id) from None
        return client.handle

    def forget(self, pool_id: str) -> None:
        """Drop a handle that failed: the supervisor may have replaced the actor."""
        self._client(pool_id).forget()

    async def call(self, pool_id: str, method: str, *args: Any, timeout: Optional[float] = None,
                   retry: bool = False) -> Any:
        """``method`` of the pool's actor; Ray's failures as POOL_UNAVAILABLE. ``retry``: once
        more through a fresh lookup when the actor behind the handle died (reads only)."""
        client = self._client(pool_id)
        for attempt in range(2 if retry else 1):
            try:
                handle = await client.get()
            except ValueError:
                raise PoolNotRunning(pool_id) from None
            try:
                pending = getattr(handle, method).remote(*args)
                return await (asyncio.wait_for(pending, timeout) if timeout is not None else pending)
            except ray.exceptions.RayActorError as exc:
                if client.handle is handle:
                    client.forget()
                if attempt or not retry:
                    raise PoolLost(pool_id, exc) from None
            except asyncio.TimeoutError:
                raise unavailable(pool_id, f"did not answer within {timeout:.0f} s") from None
        raise AssertionError("unreachable")  # the last attempt returns or raises

    # -- reads ---------------------------------------------------------------------------
    async def view(self, pool_id: str) -> PoolView:
        return await self.call(pool_id, "snapshot", retry=True)

    async def detail(self, pool_id: str) -> PoolDetail:
        return await self.call(pool_id, "detail", retry=True)

    async def report(self, pool_id: str, timeout: Optional[float] = None) -> PoolSnapshot:
        """View and detail together (an operator's health check)."""
        return await self.call(pool_id, "report", timeout=timeout, retry=True)

    async def has_task(self, pool_id: str, task_id: str) -> bool:
        return await self.call(pool_id, "has_task", task_id, retry=True)

    # -- a task's life -------------------------------------------------------------------
    async def submit(self, pool_id: str, task: Union[TaskRequest, EmbeddingRequest], task_id: str,
                     correlation_id: Optional[str], context: Optional[TaskContext]) -> Admission:
        """Queue ``task`` on the pool; its refusal raised as ``OrchError``."""
        result: SubmitResult = await self.call(pool_id, "submit", task, task_id, correlation_id, context)
        if result.error is not None:
            raise raised(result.error)
        return result.admission

    async def poll(self, pool_id: str, task_id: str, cursor: int, wait_s: float, together: bool = False,
                   until_done: bool = False) -> PollResult:
        """The task's events from ``cursor``; a lost pool ends the stream with WORKER_RESET.
        ``together``: a long poll of a running task, sent with the other running streams' polls
        of the same pool (orch/serve/poll_mux.py). A queued task polls alone: it may wait long,
        and a round carries every poll it holds each time any of them has news.
        ``until_done``: the pool answers at the task's end (or after ``wait_s``), not at each token."""
        if together and wait_s > 0 and not until_done:
            return await self._mux(pool_id).poll(task_id, cursor, wait_s)
        try:
            return await self.call(pool_id, "poll", task_id, cursor, wait_s, until_done)
        except PoolLost:
            return self._lost_page(pool_id, cursor)

    def _mux(self, pool_id: str) -> PollMux:
        mux = self._muxes.get(pool_id)
        if mux is None:
            async def send(requests: Sequence[tuple[str, int]], wait_s: float) -> list[PollResult]:
                return await self.call(pool_id, "poll_many", list(requests), wait_s)

            def lost(exc: BaseException, cursor: int) -> Optional[PollResult]:
                return self._lost_page(pool_id, cursor) if isinstance(exc, PoolLost) else None

            mux = self._muxes[pool_id] = PollMux(send, lost, self.stream_interval_s)
        return mux

    @staticmethod
    def _lost_page(pool_id: str, cursor: int) -> PollResult:
        lost = SSEError(code=ErrorCode.WORKER_RESET, message=f"pool '{pool_id}' was lost while serving this "
                        "task; resubmit it", retriable=True, pool_id=pool_id)
        return PollResult(events=((cursor, "error", lost.payload()),), done=True)

    async def cancel(self, pool_id: str, task_id: str) -> CancelResult:
        try:
            return await self.call(pool_id, "cancel", task_id)
        except PoolLost:
            raise OrchError(ErrorCode.WORKER_RESET, f"pool '{pool_id}' was lost; the task is gone",
                            retriable=True, pool_id=pool_id) from None
