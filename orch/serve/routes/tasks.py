"""``/v2/tasks``: admit a task, stream its events, cancel it."""

from __future__ import annotations

import re

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orch.api.tasks import ID_PATTERN, AdmissionResponse, StreamLinks, TaskRequest
from orch.observability.logs import bind
from orch.serve import sse
from orch.serve.http import correlation_id, explain_validation, invalid, no_content, read_json
from orch.serve.auth import principal_of
from orch.serve.routing import ApiRoute
from orch.serve.service import TaskStream
from orch.serve.state import IngressState
from orch.tenants.access import scoped_id

_ID = re.compile(ID_PATTERN)


def path_id(request: Request, name: str, what: str) -> str:
    value = request.path_params[name]
    if not _ID.match(value):
        raise invalid(f"{what} id must be 1-128 characters of letters, digits and . _ : - (starting with a letter or digit)")
    return value


def links(task_id: str) -> StreamLinks:
    return StreamLinks(
        sse=f"/v2/tasks/{task_id}/events",
        sse_verbose=f"/v2/tasks/{task_id}/events?verbose=true",
        cancel=f"/v2/tasks/{task_id}/cancel",
    )


def routes(state: IngressState) -> list[ApiRoute]:
    service = state.service
    max_body = state.config.server.max_body_bytes

    async def create_task(request: Request) -> Response:
        body = await read_json(request, max_body)
        try:
            task = TaskRequest.model_validate(body)
        except ValidationError as exc:
            raise invalid(explain_validation(exc)) from None
        bind(user=task.user)
        admitted = await service.admit(task, correlation_id(request))
        result = admitted.result
        admission = AdmissionResponse(
            task_id=admitted.task_id,
            queue_position=result.queue_position,
            predicted_start_ms=result.predicted_start_ms,
            backoff_ms=result.backoff_ms,
            pool_id=admitted.pool_id,
            streams=links(admitted.task_id),
            preparation=result.preparation,
        )
        return JSONResponse(admission.model_dump(mode="json", exclude_none=True), status_code=202)

    async def task_events(request: Request) -> Response:
        task_id = scoped_id(principal_of(request), path_id(request, "task_id", "task"))
        stream = await service.open_stream(task_id, _resume_cursor(request))
        verbose = request.query_params.get("verbose", "false").lower() in ("true", "1", "yes")
        return StreamingResponse(
            _relay(stream, verbose),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def cancel_task(request: Request) -> Response:
        task_id = scoped_id(principal_of(request), path_id(request, "task_id", "task"))
        result = await service.cancel(task_id)
        return no_content({"X-Tokens-Sent": str(result.tokens_sent)})

    return [
        ApiRoute("POST", "/v2/tasks", create_task, "Admit a task into a pool's queue", "tasks",
                 body=TaskRequest, answers={202: AdmissionResponse}, scope="infer"),
        ApiRoute("GET", "/v2/tasks/{task_id}/events", task_events,
                 "Stream a task's events (started, token, metrics, end | error); resumable with Last-Event-ID",
                 "tasks", answers={200: ("text/event-stream", "Server-Sent Events")},
                 query={"verbose": "true adds narration", "last_event_id": "resume after this event id"},
                 scope="infer"),
        ApiRoute("POST", "/v2/tasks/{task_id}/cancel", cancel_task,
                 "Cancel a task; once this returns no further token is sent", "tasks", answers={204: None},
                 scope="infer"),
    ]


def _resume_cursor(request: Request) -> int:
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if last is None:
        return 0
    if not (last.isascii() and last.isdigit()) or len(last) > 12:
        raise invalid("Last-Event-ID must be the id of an event this stream sent")
    return int(last) + 1


async def _relay(stream: TaskStream, verbose: bool = False):
    async for batch in stream.batches():
        if not batch:
            yield sse.KEEPALIVE
            continue
        if not verbose:  # the narration line is for ?verbose=true only
            batch = [(index, kind, _plain(data) if kind == "metrics" else data) for index, kind, data in batch]
        yield sse.frames(batch)


def _plain(data: dict) -> dict:
    return {key: value for key, value in data.items() if key != "human"} if "human" in data else data
