"""``/v2/keys/{key_id}/usage``: a key's usage and limits, for an admin or the key itself."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.api.errors import ErrorCode
from orch.api.usage import KeyUsage
from orch.core.errors import OrchError
from orch.serve.routes.tasks import path_id
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState
from orch.tenants.access import current_principal, sees_all


def routes(state: IngressState) -> list[ApiRoute]:
    async def usage(request: Request) -> Response:
        key_id = path_id(request, "key_id", "key")
        principal = current_principal()
        # Another key's usage is answered like a key that does not exist, so ids do not leak.
        if not sees_all(principal) and principal.key_id != key_id:
            raise OrchError(ErrorCode.NOT_FOUND, f"no key '{key_id}'")
        keys = state.extras.get("keys")
        info = await keys.backend.get(key_id) if keys is not None else None
        if keys is not None and info is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no key '{key_id}'")
        limits = info.get("limits") if info else None
        found = await state.service.limits.usage(key_id, limits)
        if info is None and found is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no key '{key_id}'")
        body = dict(found or {}, key_id=key_id)
        body["tenant"] = info["tenant"] if info else body.get("tenant", "")
        body["limits"] = limits or {}
        return JSONResponse(KeyUsage.model_validate(body).model_dump(mode="json"))

    return [
        ApiRoute("GET", "/v2/keys/{key_id}/usage", usage,
                 "A key's usage (requests, refusals, tokens in and out, its tenant's totals) and where its "
                 "limits stand; an admin key or the key itself", "keys", answers={200: KeyUsage}, scope=None),
    ]

