"""``/v2/sessions``: a session's turns, budgets and placement (never its content); delete it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.api.errors import ErrorCode
from orch.api.sessions import SessionInfo
from orch.core.errors import OrchError
from orch.serve.http import no_content
from orch.serve.routes.tasks import path_id
from orch.serve.auth import principal_of
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState
from orch.tenants.access import scoped_id


def routes(state: IngressState) -> list[ApiRoute]:
    def gate():
        if state.sessions is None:
            raise OrchError(ErrorCode.POOL_UNAVAILABLE, "sessions are not reachable from this ingress",
                            retriable=True, retry_after_ms=1000)
        return state.sessions

    def missing(session_id: str) -> OrchError:
        return OrchError(ErrorCode.NOT_FOUND,
                         f"no session '{session_id}' (never used by an admitted task, deleted, or expired)")

    async def read(request: Request) -> Response:
        session_id = scoped_id(principal_of(request), path_id(request, "session_id", "session"))
        info = await gate().info(session_id)
        if info is None:
            raise missing(session_id)
        return JSONResponse(SessionInfo.model_validate(info).model_dump(mode="json"))

    async def delete(request: Request) -> Response:
        session_id = scoped_id(principal_of(request), path_id(request, "session_id", "session"))
        if not await gate().delete(session_id):
            raise missing(session_id)
        return no_content()

    return [
        ApiRoute("GET", "/v2/sessions/{session_id}", read,
                 "A session's TTL, turns, KV warmth and budgets left (metadata only, never content)", "sessions",
                 answers={200: SessionInfo}, errors=(400, 401, 404, 503), scope="infer"),
        ApiRoute("DELETE", "/v2/sessions/{session_id}", delete,
                 "Forget a session; its id starts a fresh session next time", "sessions",
                 answers={204: None}, errors=(400, 401, 404, 503), scope="infer"),
    ]
