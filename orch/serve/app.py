"""The ingress ASGI app: the v2 task API, health and readiness.

Stateless apart from caches: the pools own queues and task events, so any replica can
serve any request.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import ray
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from orch.api.errors import ErrorCode
from orch.api.tasks import ID_PATTERN, AdmissionResponse, StreamLinks, TaskRequest
from orch.config import OrchConfig
from orch.core.errors import OrchError
from orch.core.placement import place
from orch.serve import sse
from orch.serve.http import (
    CorrelationIdMiddleware,
    correlation_id,
    error_response,
    explain_validation,
    invalid,
    no_content,
    read_json,
)
from orch.serve.registry import PoolRegistry

log = logging.getLogger("orch.ingress")

#: Seconds one poll of a pool waits for new events before the stream sends a keepalive.
POLL_WAIT_S = 15.0
_ID = re.compile(ID_PATTERN)


@dataclass
class IngressState:
    config: OrchConfig
    registry: PoolRegistry


def _task_id_from_path(request: Request) -> str:
    task_id = request.path_params["task_id"]
    if not _ID.match(task_id):
        raise invalid("task id must be 1-128 characters of letters, digits and . _ : -")
    return task_id


def _links(task_id: str) -> StreamLinks:
    return StreamLinks(
        sse=f"/v2/tasks/{task_id}/events",
        sse_verbose=f"/v2/tasks/{task_id}/events?verbose=true",
        cancel=f"/v2/tasks/{task_id}/cancel",
    )


def build_app(state: IngressState) -> Starlette:
    registry = state.registry
    max_body = state.config.server.max_body_bytes

    async def create_task(request: Request) -> Response:
        body = await read_json(request, max_body)
        try:
            task = TaskRequest.model_validate(body)
        except ValidationError as exc:
            raise invalid(explain_validation(exc)) from None
        views = await registry.views()
        decision = place(
            views,
            engine=task.engine.value if task.engine else None,
            model_ref=task.model_ref,
            overrides=task.placement,
        )
        task_id = task.task_id or uuid.uuid4().hex
        try:
            result = await registry.handle(decision.pool_id).submit.remote(task, task_id, correlation_id(request))
        except ray.exceptions.RayActorError:
            raise OrchError(
                ErrorCode.POOL_UNAVAILABLE,
                f"pool '{decision.pool_id}' is unreachable; retry shortly",
                retriable=True,
                retry_after_ms=1000,
                pool_id=decision.pool_id,
            ) from None
        if "error" in result:
            raise OrchError.from_dict(result["error"])
        registry.remember(task_id, decision.pool_id)
        admission = AdmissionResponse(
            task_id=task_id,
            queue_position=result["queue_position"],
            predicted_start_ms=result["predicted_start_ms"],
            backoff_ms=result["backoff_ms"],
            pool_id=decision.pool_id,
            streams=_links(task_id),
        )
        return JSONResponse(admission.model_dump(), status_code=202)

    async def task_events(request: Request) -> Response:
        task_id = _task_id_from_path(request)
        cursor = _resume_cursor(request)
        pool_id = await registry.locate(task_id)
        if pool_id is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}' (unknown, or finished and expired)")
        handle = registry.handle(pool_id)
        first = await _poll(handle, task_id, cursor, 0.0, pool_id)
        if "error" in first:
            raise OrchError.from_dict(first["error"])
        return StreamingResponse(
            _stream(handle, task_id, cursor, first, pool_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def cancel_task(request: Request) -> Response:
        task_id = _task_id_from_path(request)
        pool_id = await registry.locate(task_id)
        if pool_id is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}' (unknown, or finished and expired)")
        try:
            result = await registry.handle(pool_id).cancel.remote(task_id)
        except ray.exceptions.RayActorError:
            raise OrchError(ErrorCode.WORKER_RESET, f"pool '{pool_id}' was lost; the task is gone",
                            retriable=True, pool_id=pool_id) from None
        if not result.get("found"):
            raise OrchError(ErrorCode.NOT_FOUND, f"no task '{task_id}'")
        return no_content({"X-Tokens-Sent": str(result["tokens_sent"])})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        rows = await registry.rows()
        pools = {
            pid: {"ready": row["ready"], "draining": row.get("draining", False), "last_error": row.get("last_error")}
            for pid, row in rows.items()
        }
        ready = any(p["ready"] and not p["draining"] for p in pools.values())
        return JSONResponse({"ready": ready, "pools": pools}, status_code=200 if ready else 503)

    routes = [
        Route("/v2/tasks", create_task, methods=["POST"]),
        Route("/v2/tasks/{task_id}/events", task_events, methods=["GET"]),
        Route("/v2/tasks/{task_id}/cancel", cancel_task, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(CorrelationIdMiddleware)],
        exception_handlers={
            OrchError: _on_orch_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected,
        },
    )


def _resume_cursor(request: Request) -> int:
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if last is None:
        return 0
    if not last.isdigit() or len(last) > 12:
        raise invalid("Last-Event-ID must be the id of an event this stream sent")
    return int(last) + 1


async def _poll(handle, task_id: str, cursor: int, wait_s: float, pool_id: str) -> dict[str, Any]:
    try:
        return await handle.poll.remote(task_id, cursor, wait_s)
    except ray.exceptions.RayActorError:
        return {
            "events": [(cursor, "error", {
                "code": ErrorCode.WORKER_RESET.value,
                "message": f"pool '{pool_id}' was lost while serving this task; resubmit it",
                "retriable": True,
                "pool_id": pool_id,
            })],
            "done": True,
        }


async def _stream(handle, task_id: str, cursor: int, first: dict[str, Any], pool_id: str) -> AsyncIterator[str]:
    """Relay the task's events in batches: everything ready since the last hop, one write."""
    result = first
    while True:
        if "error" in result:  # the task expired between polls
            yield sse.frame(cursor, "error", result["error"])
            return
        events = result["events"]
        if events:
            yield sse.frames(events)
            cursor = events[-1][0] + 1
        elif not result["done"] and result is not first:
            yield sse.KEEPALIVE
        if result["done"]:
            return
        result = await _poll(handle, task_id, cursor, POLL_WAIT_S, pool_id)


async def _on_orch_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OrchError)
    return error_response(exc, request)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = OrchError(ErrorCode.NOT_FOUND, f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = OrchError(ErrorCode.INVALID_PARAMS, f"method {request.method} is not allowed on {request.url.path}")
        response = error_response(error, request)
        response.status_code = 405
        return response
    else:
        error = OrchError(ErrorCode.INVALID_PARAMS, str(exc.detail))
    return error_response(error, request)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(OrchError(ErrorCode.INTERNAL, "internal error; the correlation id identifies it in the logs"), request)
