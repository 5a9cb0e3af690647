"""The auth seam: API keys, the bootstrap token, the loopback bypass, and who made each request.

Tokens are compared in constant time (``hmac.compare_digest`` over their sha256; keys over
their salted sha256) and never logged: a request's identity is ``localhost``,
``token:<first 6 hex of the token's sha256>`` or ``key:<key id>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any, Optional

from starlette.types import ASGIApp, Receive, Scope, Send

from orch.api.errors import ErrorCode
from orch.api.keys import SCOPES, Principal
from orch.core.net import is_loopback
from orch.observability.logs import bind
from orch.tenants.access import ADMIN_TENANT, PRINCIPAL
from orch.tenants.keyhash import looks_like_key

log = logging.getLogger("orch.access")

#: Paths anyone may fetch: the probe a load balancer uses, and the status page with its
#: redirect (static HTML holding no data; it asks for the token and sends it with each call).
OPEN_PATHS = frozenset({"/healthz", "/ui", "/"})


def token_identity(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:6]


def _client_is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    return bool(client) and is_loopback(str(client[0]))


def route_path(scope: Scope) -> str:
    """The request's path below the app's route prefix (``root_path``), as routes declare it."""
    path = scope.get("path", "")
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def _bearer(scope: Scope) -> Optional[str]:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text = value.decode("latin-1")
            scheme, _, credential = text.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                return ""
            return credential.strip()
    return None


#: The server's configured token: an admin key of tenant ``admin``.
BOOTSTRAP = Principal(key_id="bootstrap", tenant=ADMIN_TENANT, scopes=frozenset(SCOPES), bootstrap=True)


def principal_of(request_or_scope: Any) -> Optional[Principal]:
    """The request's principal (None: auth off or the loopback bypass; tenant ``default``)."""
    scope = getattr(request_or_scope, "scope", request_or_scope)
    return scope.get("state", {}).get("principal")


class AuthMiddleware:
    """Pure ASGI: lets a request through with ``scope['state']['identity']`` and
    ``['principal']`` set, or answers 401.

    A bearer shaped like an API key (``orch_...``) is always checked against the key cache,
    even where the bootstrap token is not needed (auth off, the loopback bypass): a revoked
    key never works. Any other bearer is the bootstrap token, checked as before.
    """

    def __init__(self, app: ASGIApp, token: Optional[str], loopback_bypass: bool, keys: Any = None) -> None:
        self.app = app
        self.loopback_bypass = loopback_bypass
        self._digest = hashlib.sha256(token.encode("utf-8")).digest() if token else None
        self._identity = token_identity(token) if token else None
        #: The replica's key cache (orch/tenants/cache.py); None: no key store reachable.
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        loopback = _client_is_loopback(scope)
        state["identity"] = state["principal"] = None
        PRINCIPAL.set(None)
        given = _bearer(scope)
        opened = route_path(scope) in OPEN_PATHS
        if given and looks_like_key(given) and not opened:
            principal = await self.keys.resolve_fresh(given) if self.keys is not None else None
            if principal is None:
                log.warning("refused %s %s: unknown, revoked or rotated API key identity=unauthenticated",
                            scope.get("method"), scope.get("path"))
                await _unauthorized(scope, send, "unknown, revoked or rotated API key; ask an admin for a valid key")
                return
            await self._admit(scope, receive, send, principal, f"key:{principal.key_id}")
            return
        if self._digest is None or (self.loopback_bypass and loopback) or opened:
            state["identity"] = "localhost" if loopback else "anonymous"
            await self.app(scope, receive, _logged(scope, send))
            return
        if given:
            candidate = hashlib.sha256(given.encode("utf-8")).digest()
            if hmac.compare_digest(candidate, self._digest):
                await self._admit(scope, receive, send, BOOTSTRAP, self._identity)
                return
        reason = "missing" if given is None else ("malformed" if given == "" else "wrong")
        log.warning("refused %s %s: %s bearer token identity=unauthenticated", scope.get("method"), scope.get("path"), reason)
        await _unauthorized(scope, send, f"{reason} bearer token; send 'Authorization: Bearer <token>' with the "
                                         "token configured on the server or an API key")

    async def _admit(self, scope: Scope, receive: Receive, send: Send, principal: Principal, identity: str) -> None:
        scope["state"].update(identity=identity, principal=principal)
        PRINCIPAL.set(principal)
        await self.app(scope, receive, _logged(scope, send))


QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _quiet(scope: Scope) -> bool:
    """Probes and the status page's polling (reads) stay out of the INFO log."""
    path = scope.get("path", "")
    if path in QUIET_PATHS:
        return True
    return scope.get("method") == "GET" and (path == "/v2/tasks" or path.endswith("/health") or path.endswith("/ui"))


def _logged(scope: Scope, send: Send) -> Send:
    """One access line per request, with who made it (never the token)."""

    async def send_and_log(message) -> None:
        if message["type"] == "http.response.start":
            state = scope.get("state", {})
            bind(identity=state.get("identity"))
            level = logging.DEBUG if _quiet(scope) else logging.INFO
            log.log(level, "%s %s %s identity=%s correlation_id=%s", scope.get("method"), scope.get("path"),
                    message.get("status"), state.get("identity"), state.get("correlation_id"))
        await send(message)

    return send_and_log


async def _unauthorized(scope: Scope, send: Send, message: str) -> None:
    correlation = scope.get("state", {}).get("correlation_id")
    body = {
        "code": ErrorCode.UNAUTHORIZED.value,
        "message": message,
        "retriable": False,
    }
    if correlation:
        body["correlation_id"] = correlation
    if scope.get("path", "").startswith("/v1/"):
        body = {"error": {"message": body["message"], "type": "authentication_error", "param": None,
                          "code": ErrorCode.UNAUTHORIZED.value}}
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
        (b"www-authenticate", b'Bearer realm="llama-orch"')]})
    await send({"type": "http.response.body", "body": raw})
