"""``/v2/keys``: create, list, read, revoke and rotate API keys (admin scope).

A key's secret is answered once, by create and rotate; the store keeps its salted hash.
Every action writes one ``orch.audit`` line: who, what, when and the key id, never a
secret.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.api.errors import ErrorCode
from orch.api.keys import KeyCreate, KeyCreated, KeyInfo, KeyList
from orch.core.errors import OrchError
from orch.serve.http import explain_validation, invalid, read_json
from orch.serve.routes.tasks import path_id
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState

audit = logging.getLogger("orch.audit")


def routes(state: IngressState) -> list[ApiRoute]:
    max_body = state.config.server.max_body_bytes
    tenants = state.config.tenants

    def cache():
        keys = state.extras.get("keys")
        if keys is None:
            raise OrchError(ErrorCode.POOL_UNAVAILABLE, "the key store is not reachable from this ingress",
                            retriable=True, retry_after_ms=1000)
        return keys

    async def changed(request: Request, action: str, info: dict[str, Any]) -> None:
        """The audit line, and this replica's cache brought up to date at once (the others
        follow within a second)."""
        who = request.scope.get("state", {}).get("identity") or "anonymous"
        audit.info("audit: %s key %s of tenant %s by %s at %s", action, info["key_id"], info["tenant"], who,
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   extra={"audit_action": action, "key_id": info["key_id"], "tenant": info["tenant"], "actor": who})
        try:
            await cache().refresh()
        except Exception:  # the replica's loop catches up on its next poll
            pass

    def found(key_id: str, info: Any) -> dict[str, Any]:
        if info is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no key '{key_id}'")
        return info

    async def create(request: Request) -> Response:
        body = await read_json(request, max_body)
        try:
            wanted = KeyCreate.model_validate(body)
        except ValidationError as exc:
            raise invalid(explain_validation(exc)) from None
        if wanted.tenant not in tenants.names():
            raise invalid(f"tenant: '{wanted.tenant}' is not declared; declare it under tenants.declared in the "
                          f"config (declared: {', '.join(tenants.names())})")
        info = await cache().backend.create(wanted.model_dump(mode="json"))
        await changed(request, "create", info)
        return JSONResponse(KeyCreated.model_validate(info).model_dump(mode="json"), status_code=201)

    async def list_keys(request: Request) -> Response:
        tenant = request.query_params.get("tenant")
        rows = await cache().backend.list(tenant)
        return JSONResponse(KeyList(keys=[KeyInfo.model_validate(row) for row in rows]).model_dump(mode="json"))

    async def read(request: Request) -> Response:
        key_id = path_id(request, "key_id", "key")
        info = found(key_id, await cache().backend.get(key_id))
        return JSONResponse(KeyInfo.model_validate(info).model_dump(mode="json"))

    async def revoke(request: Request) -> Response:
        key_id = path_id(request, "key_id", "key")
        info = found(key_id, await cache().backend.revoke(key_id))
        await changed(request, "revoke", info)
        return JSONResponse(KeyInfo.model_validate(info).model_dump(mode="json"))

    async def rotate(request: Request) -> Response:
        key_id = path_id(request, "key_id", "key")
        info = await cache().backend.rotate(key_id)
        if info is None:
            if found(key_id, await cache().backend.get(key_id)):
                raise invalid(f"key '{key_id}' is revoked; create a new key instead")
        await changed(request, "rotate", info)
        return JSONResponse(KeyCreated.model_validate(info).model_dump(mode="json"))

    return [
        ApiRoute("POST", "/v2/keys", create, "Create an API key; the answer holds its secret, shown only this once",
                 "keys", body=KeyCreate, answers={201: KeyCreated}, scope="admin"),
        ApiRoute("GET", "/v2/keys", list_keys, "Every API key (never a secret or its hash)", "keys",
                 answers={200: KeyList}, query={"tenant": "only this tenant's keys"}, scope="admin"),
        ApiRoute("GET", "/v2/keys/{key_id}", read, "One API key (never its secret or hash)", "keys",
                 answers={200: KeyInfo}, scope="admin"),
        ApiRoute("POST", "/v2/keys/{key_id}/revoke", revoke,
                 "Revoke a key; every ingress replica refuses it within a second", "keys",
                 answers={200: KeyInfo}, scope="admin"),
        ApiRoute("POST", "/v2/keys/{key_id}/rotate", rotate,
                 "A new secret for the key (same id, limits and usage); the old one stops working", "keys",
                 answers={200: KeyCreated}, scope="admin"),
    ]
