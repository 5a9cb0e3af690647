"""Routes declared once, with their contract types, so the OpenAPI document is complete.

Each ``ApiRoute`` names its request body model and its answers (status -> model or a
media-type description); ``openapi_document`` turns the list into ``/openapi.json`` with
the pydantic JSON schemas under ``components/schemas``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Union

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orch.api.errors import ErrorEnvelope
from orch.tenants.access import check_scope

Handler = Callable[[Request], Awaitable[Response]]
#: An answer: a pydantic model (JSON), or (media type, description) for streams and text.
Answer = Union[type[BaseModel], tuple[str, str], None]


@dataclass
class ApiRoute:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: Optional[type[BaseModel]] = None
    answers: dict[int, Answer] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)  # name -> description (strings)
    #: Models of the error answers; the v2 envelope unless a route family says otherwise.
    error_model: type[BaseModel] = ErrorEnvelope
    errors: tuple[int, ...] = (400, 401, 404, 429, 503)
    include_in_schema: bool = True
    #: The key scope a caller needs (``infer``, ``catalog``, ``admin``); None: any caller
    #: the auth middleware let in. Admin unless the route says otherwise, so a route that
    #: forgets to declare one is closed rather than open.
    scope: Optional[str] = "admin"

    def starlette(self) -> Route:
        return Route(self.path, _scoped(self.handler, self.scope), methods=[self.method])


def _scoped(handler: Handler, scope: Optional[str]) -> Handler:
    """The handler behind a check of the caller's scope (403 FORBIDDEN naming it)."""
    if scope is None:
        return handler

    async def guarded(request: Request) -> Response:
        check_scope(request.scope.get("state", {}).get("principal"), scope)
        return await handler(request)

    guarded.__name__ = getattr(handler, "__name__", "handler")
    return guarded


def openapi_document(routes: list[ApiRoute], *, title: str, version: str, description: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault(model.__name__, schema)
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    paths: dict[str, Any] = {}
    for route in routes:
        if not route.include_in_schema:
            continue
        operation: dict[str, Any] = {
            "summary": route.summary,
            "tags": [route.tag],
            "operationId": f"{route.method.lower()}_{route.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"
            or "root",
            "responses": {},
        }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 128}}
            for name in _path_params(route.path)
        ]
        parameters += [
            {"name": name, "in": "query", "required": False, "description": text, "schema": {"type": "string"}}
            for name, text in route.query.items()
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(route.body)}}}
        for status, answer in route.answers.items():
            operation["responses"][str(status)] = _answer(answer, ref)
        for status in route.errors + ((403,) if route.scope and route.errors else ()):
            operation["responses"].setdefault(
                str(status), {"description": "error", "content": {"application/json": {"schema": ref(route.error_model)}}}
            )
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


def _answer(answer: Answer, ref: Callable[[type[BaseModel]], dict[str, str]]) -> dict[str, Any]:
    if answer is None:
        return {"description": "no content"}
    if isinstance(answer, tuple):
        media, description = answer
        return {"description": description, "content": {media: {"schema": {"type": "string"}}}}
    return {"description": answer.__doc__.strip().splitlines()[0] if answer.__doc__ else answer.__name__,
            "content": {"application/json": {"schema": ref(answer)}}}


def _path_params(path: str) -> list[str]:
    import re

    return re.findall(r"{([^}:]+)", path)
