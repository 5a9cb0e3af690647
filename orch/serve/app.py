"""The ingress ASGI app: every route of the HTTP surface, its middleware and error mapping.

Stateless apart from caches: the pools own queues and task events and the singleton actors
own sessions and artifacts, so any replica can serve any request.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from orch.api.errors import ErrorCode
from orch.api.meta import API_VERSION
from orch.core.errors import OrchError
from orch.serve.auth import AuthMiddleware
from orch.serve.http import CorrelationIdMiddleware, error_response
from orch.serve.limits import RateLimitHeaders
from orch.serve.routes import (artifacts, catalog, keys, meta, models, openai, ops, pools, sessions, tasks, trace, ui,
                                usage)
from orch.serve.routing import ApiRoute, openapi_document
from orch.serve.state import IngressState

log = logging.getLogger("orch.ingress")

DESCRIPTION = (
    "LLM orchestrator on Ray: bounded per-pool queues with priorities and backpressure, "
    "deterministic placement, SSE token streams, and an OpenAI-compatible API."
)


def api_routes(state: IngressState) -> list[ApiRoute]:
    found: list[ApiRoute] = []
    found += tasks.routes(state)
    found += trace.routes(state)
    found += sessions.routes(state)
    found += pools.routes(state)
    found += models.routes(state)
    found += artifacts.routes(state)
    found += catalog.routes(state)
    found += ops.routes(state)
    found += keys.routes(state)
    found += usage.routes(state)
    found += ui.routes(state)
    found += openai.routes(state)
    found += meta.routes(state, lambda: document)
    document = openapi_document(found, title="llama-orch", version=API_VERSION, description=DESCRIPTION)
    return found


def build_app(state: IngressState) -> Starlette:
    routes = api_routes(state)
    server = state.config.server
    middleware = [Middleware(CorrelationIdMiddleware), Middleware(RateLimitHeaders)]
    if server.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(server.cors_origins),
                                     allow_methods=["GET", "POST", "DELETE"],
                                     allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Correlation-Id"]))
    middleware.append(Middleware(AuthMiddleware, token=server.token(), loopback_bypass=server.loopback_bypass,
                                 keys=state.extras.get("keys")))
    app = Starlette(
        routes=[route.starlette() for route in routes],
        middleware=middleware,
        exception_handlers={
            OrchError: _on_orch_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected,
        },
    )
    app.state.api_routes = routes
    return app


async def _on_orch_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OrchError)
    if openai.is_openai_path(request):
        return openai.error_response_openai(exc, request)
    return error_response(exc, request)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = OrchError(ErrorCode.NOT_FOUND, f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = OrchError(ErrorCode.INVALID_PARAMS, f"method {request.method} is not allowed on {request.url.path}")
        if openai.is_openai_path(request):
            return openai.error_response_openai(error, request, status=405)
        response = error_response(error, request)
        response.status_code = 405
        return response
    else:
        error = OrchError(ErrorCode.INVALID_PARAMS, str(exc.detail))
    if openai.is_openai_path(request):
        return openai.error_response_openai(error, request)
    return error_response(error, request)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    error = OrchError(ErrorCode.INTERNAL, "internal error; the correlation id identifies it in the logs")
    if openai.is_openai_path(request):
        return openai.error_response_openai(error, request)
    return error_response(error, request)
