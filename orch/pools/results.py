"""What a pool answers over its boundary: admissions, stream pages, cancel outcomes and the
error payloads a task can end with. Built here only, as the types of orch/api/pools.py."""

from __future__ import annotations

from typing import Any, Optional

from orch.api.errors import ErrorCode
from orch.api.events import SSEError
from orch.api.pools import Admission, CancelResult, PollResult, PoolError, SubmitResult, TaskEvent, TaskMarks
from orch.core.errors import OrchError


def error_payload(pool_id: str, engine: str, code: ErrorCode, message: str, *, retriable: bool = False,
                  retry_after_ms: Optional[int] = None) -> dict[str, Any]:
    """The data of a task's terminal ``error`` event."""
    return SSEError(code=code, message=message, retriable=retriable, retry_after_ms=retry_after_ms, engine=engine,
                    pool_id=pool_id).payload()


def pool_error(exc: OrchError, preparation: Optional[dict[str, Any]] = None) -> PoolError:
    return PoolError(exc.code, exc.message, retriable=exc.retriable, retry_after_ms=exc.retry_after_ms,
                     pool_id=exc.pool_id, engine=exc.engine, policy_label=exc.policy_label, preparation=preparation)


def refused(exc: OrchError, preparation: Optional[dict[str, Any]] = None) -> SubmitResult:
    """A submit the pool refused; a pool preparing its model says how far it got."""
    return SubmitResult(error=pool_error(exc, preparation))


def admitted(task_id: str, pool_id: str, position: int, predicted_start_ms: int, backoff_ms: int,
             prompt_tokens: int, seed: int, preparation: Optional[dict[str, Any]] = None,
             deferred: bool = False) -> SubmitResult:
    return SubmitResult(admission=Admission(
        task_id=task_id, pool_id=pool_id, queue_position=position, predicted_start_ms=predicted_start_ms,
        backoff_ms=backoff_ms, prompt_tokens=prompt_tokens, seed=seed, preparation=preparation if deferred else None))


def unknown_task(task_id: str, pool_id: str) -> PollResult:
    return PollResult(error=PoolError(ErrorCode.NOT_FOUND, f"no task '{task_id}' in pool '{pool_id}'"))


def page(events: list[TaskEvent], done: bool, marks: Optional[TaskMarks] = None) -> PollResult:
    return PollResult(events=tuple(events), done=done, marks=marks)


def cancel_not_found() -> CancelResult:
    return CancelResult(found=False)


def cancelled(was_queued: bool, tokens_sent: int, acknowledged: bool) -> CancelResult:
    return CancelResult(found=True, was_queued=was_queued, tokens_sent=tokens_sent, acknowledged=acknowledged)
