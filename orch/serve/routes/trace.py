"""``GET /v2/tasks/{id}/trace``: where one request's first-token time went, as this ingress
replica saw it (orch/observability/trace.py). Timing only: ids and clock readings."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.api.errors import ErrorCode
from orch.core.errors import OrchError
from orch.serve.routes.tasks import path_id
from orch.serve.auth import principal_of
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState
from orch.tenants.access import scoped_id


def routes(state: IngressState) -> list[ApiRoute]:
    traces = state.service.traces

    async def task_trace(request: Request) -> Response:
        task_id = scoped_id(principal_of(request), path_id(request, "task_id", "task"))
        trace = traces.get(task_id)
        if trace is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no trace of task '{task_id}' on this ingress replica "
                            "(admitted by another replica, or older than its newest traces)")
        return JSONResponse(trace.to_dict())

    return [
        ApiRoute("GET", "/v2/tasks/{task_id}/trace", task_trace,
                 "A task's hop marks (monotonic seconds) and its first-token split into orchestrator, queue "
                 "and engine milliseconds, as the replica that admitted it saw them", "tasks",
                 answers={200: ("application/json", "marks and split_ms")}, errors=(400, 401, 404), scope="infer"),
    ]
