"""Errors of the /v1 routes in OpenAI's shape (``{"error": {message, type, param, code}}``)
with the orchestrator's details, and the request validation that produces them."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from orch.api.errors import ErrorCode, field_path
from orch.api.openai import (
    UNKNOWN_PARAMETER,
    UNSUPPORTED_PARAMETER,
    OpenAIErrorDetail,
    OpenAIErrorResponse,
    error_type,
)
from orch.core.errors import OrchError
from orch.serve.http import backpressure, correlation_id, explain_validation

PREFIX = "/v1/"
#: Envelope fields an OpenAI error detail carries too.
_DETAILS = ("retriable", "retry_after_ms", "policy_label", "pool_id", "engine", "preparation")
#: Validation error types that have an OpenAI code of their own.
_OPENAI_CODES = {UNSUPPORTED_PARAMETER: UNSUPPORTED_PARAMETER, "extra_forbidden": UNKNOWN_PARAMETER}


class OpenAIRequestError(OrchError):
    """An OrchError that also names the offending field and, where one fits, an
    OpenAI-specific ``code`` (model_not_found, unsupported_parameter, unknown_parameter)."""

    def __init__(self, code: ErrorCode, message: str, *, param: Optional[str] = None,
                 openai_code: Optional[str] = None, **fields: Any) -> None:
        super().__init__(code, message, **fields)
        self.param = param
        self.openai_code = openai_code


def is_openai_path(request: Request) -> bool:
    """True for the /v1 routes, wherever the app is mounted."""
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.startswith(PREFIX)


def error_body(exc: OrchError, correlation: Optional[str] = None,
               defaults: Optional[dict[str, Any]] = None) -> OpenAIErrorResponse:
    """The error in OpenAI's shape; ``defaults`` fill envelope fields the error leaves out."""
    envelope = exc.to_dict()
    for key, value in (defaults or {}).items():
        envelope.setdefault(key, value)
    return OpenAIErrorResponse(error=OpenAIErrorDetail(
        message=exc.message,
        type=error_type(exc.http_status),
        param=getattr(exc, "param", None),
        code=getattr(exc, "openai_code", None) or exc.code.value,
        correlation_id=correlation or None,
        **{key: envelope.get(key) for key in _DETAILS},
    ))


def error_response_openai(exc: OrchError, request: Request, status: Optional[int] = None) -> JSONResponse:
    """The v2 answer's status and backpressure (Retry-After, X-Backoff-Ms and the 429
    fields) with the body in OpenAI's shape."""
    fields, headers = backpressure(exc)
    body = error_body(exc, correlation_id(request), fields)
    return JSONResponse(body.model_dump(mode="json"), status_code=status or exc.http_status, headers=headers)


def refused(exc: ValidationError, param: Optional[str] = None) -> OpenAIRequestError:
    """A 400 for the first invalid field (``param`` overrides its name)."""
    first = exc.errors()[0]
    return OpenAIRequestError(ErrorCode.INVALID_PARAMS, explain_validation(exc),
                              param=param or _param(first["loc"]), openai_code=_OPENAI_CODES.get(first["type"]))


def validated(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise refused(exc) from None


def _param(loc: tuple) -> Optional[str]:
    return field_path(loc) or None
