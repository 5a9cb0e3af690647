"""HTTP plumbing shared by every route: correlation ids, typed error answers, body limits."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Any, Optional

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orch.api.errors import ErrorCode
from orch.core.errors import OrchError
from orch.observability.logs import bind
from orch.observability.trace import RECEIVED_AT

CORRELATION_HEADER = "x-correlation-id"
_CORRELATION_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class CorrelationIdMiddleware:
    """Echo a well-formed ``X-Correlation-Id`` or generate one, on every response, and note
    when the request arrived (the first mark of its trace).

    Pure ASGI (no response buffering), so streams keep flowing token by token.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        RECEIVED_AT.set(time.monotonic())
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"x-correlation-id":
                given = value.decode("latin-1")
                break
        correlation_id = given if given and _CORRELATION_OK.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        bind(correlation_id=correlation_id)
        raw = correlation_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-correlation-id"]
                headers.append((b"x-correlation-id", raw))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, send_with_id)


def correlation_id(request: Request) -> str:
    return request.scope.get("state", {}).get("correlation_id", "")


def backpressure(exc: OrchError) -> tuple[dict[str, Any], dict[str, str]]:
    """What a refusal tells a client that should back off: the body fields a 429 always
    carries (where the error gives none) and the Retry-After / X-Backoff-Ms headers."""
    if exc.http_status == 429:
        retry_ms = exc.retry_after_ms if exc.retry_after_ms is not None else 1000
        fields = {"retriable": True, "retry_after_ms": retry_ms, "policy_label": "reject"}
        return fields, {"Retry-After": str(max(1, math.ceil(retry_ms / 1000))), "X-Backoff-Ms": str(retry_ms)}
    if exc.retry_after_ms is not None and exc.http_status == 503:
        return {}, {"Retry-After": str(max(1, math.ceil(exc.retry_after_ms / 1000)))}
    return {}, {}


def error_response(exc: OrchError, request: Optional[Request] = None) -> JSONResponse:
    body = exc.to_dict()
    if request is not None:
        body["correlation_id"] = correlation_id(request)
    fields, headers = backpressure(exc)
    for key, value in fields.items():
        body.setdefault(key, value)
    return JSONResponse(body, status_code=exc.http_status, headers=headers)


def invalid(message: str) -> OrchError:
    return OrchError(ErrorCode.INVALID_PARAMS, message)


def explain_validation(exc: ValidationError) -> str:
    parts = []
    for item in exc.errors()[:8]:
        loc = ".".join(str(p) for p in item["loc"]) or "body"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field"
        elif item["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{loc}: {msg}")
    return "invalid request: " + "; ".join(parts)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON, refusing oversized, non-UTF-8 or malformed input with typed errors."""
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise invalid("Content-Length is not a number")
        if len(length) > 18 or int(length) > max_bytes:
            raise OrchError(ErrorCode.INVALID_PARAMS,
                            f"request body of {length[:24]} bytes exceeds the limit of {max_bytes} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise OrchError(ErrorCode.INVALID_PARAMS, f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise invalid("request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("request body is not valid UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise invalid("request body is nested too deeply") from None
    except ValueError as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None


def no_content(headers: Optional[dict[str, str]] = None) -> Response:
    return Response(status_code=204, headers=headers)
