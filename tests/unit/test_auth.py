"""The auth seam on a minimal app: tokens, the loopback bypass, identities in the logs."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from orch.config import ConfigError, check_bind_auth, parse_config, to_wire
from orch.serve.auth import AuthMiddleware, token_identity
from orch.serve.http import CorrelationIdMiddleware
from tests.conftest import home_config

TOKEN = "s3cret-token-0123456789"


def make_app(token, bypass):
    async def whoami(request):
        return JSONResponse({"identity": request.scope["state"]["identity"]})

    routes = [Route("/v2/whoami", whoami), Route("/v1/models", whoami), Route("/healthz", whoami)]
    return Starlette(routes=routes, middleware=[Middleware(CorrelationIdMiddleware),
                                                Middleware(AuthMiddleware, token=token, loopback_bypass=bypass)])


def call(app, path, client_host, headers=None):
    async def go():
        transport = httpx.ASGITransport(app=app, client=(client_host, 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
            return await client.get(path, headers=headers or {})

    return asyncio.run(go())


@pytest.mark.parametrize(
    "headers, reason",
    [({}, "missing"), ({"Authorization": "Bearer nope"}, "wrong"), ({"Authorization": "Basic abc"}, "malformed"),
     ({"Authorization": "Bearer "}, "malformed"), ({"Authorization": f"Bearer {TOKEN}x"}, "wrong")],
)
def test_requests_without_the_right_token_get_401(headers, reason):
    response = call(make_app(TOKEN, bypass=False), "/v2/whoami", "127.0.0.1", headers)
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "UNAUTHORIZED" and reason in body["message"] and TOKEN not in response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert body["correlation_id"] == response.headers["x-correlation-id"]


def test_the_right_token_passes_with_a_hashed_identity():
    response = call(make_app(TOKEN, bypass=False), "/v2/whoami", "10.1.2.3", {"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.json()["identity"] == token_identity(TOKEN) and len(token_identity(TOKEN)) == len("token:") + 6


def test_loopback_bypass_applies_to_loopback_clients_only():
    app = make_app(TOKEN, bypass=True)
    assert call(app, "/v2/whoami", "127.0.0.1").json()["identity"] == "localhost"
    assert call(app, "/v2/whoami", "::1").status_code == 200
    remote = call(app, "/v2/whoami", "192.168.1.20")
    assert remote.status_code == 401
    assert call(app, "/v2/whoami", "192.168.1.20", {"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_openai_routes_get_openai_shaped_401():
    response = call(make_app(TOKEN, bypass=False), "/v1/models", "127.0.0.1")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_health_probe_needs_no_token():
    assert call(make_app(TOKEN, bypass=False), "/healthz", "10.0.0.1").status_code == 200


def test_logs_name_the_identity_never_the_token(caplog):
    caplog.set_level(logging.DEBUG, logger="orch.access")
    app = make_app(TOKEN, bypass=True)
    call(app, "/v2/whoami", "127.0.0.1")
    call(app, "/v2/whoami", "10.0.0.9", {"Authorization": f"Bearer {TOKEN}"})
    call(app, "/v2/whoami", "10.0.0.9", {"Authorization": "Bearer wrong-token-guess"})
    text = caplog.text
    assert "identity=localhost" in text and f"identity={token_identity(TOKEN)}" in text
    assert TOKEN not in text and "wrong-token-guess" not in text


def test_non_loopback_bind_needs_a_token(monkeypatch):
    config = parse_config(home_config())
    check_bind_auth(config, "127.0.0.1")
    check_bind_auth(config, "localhost")
    for host in ("0.0.0.0", "10.0.0.5", "::"):
        with pytest.raises(ConfigError, match="no bearer token is configured"):
            check_bind_auth(config, host)
    monkeypatch.setenv("ORCH_TEST_TOKEN", TOKEN)
    data = home_config()
    data["server"] = {"host": "0.0.0.0", "auth_token_env": "ORCH_TEST_TOKEN"}
    with_token = parse_config(data)
    check_bind_auth(with_token, "0.0.0.0")
    assert TOKEN not in repr(with_token) and TOKEN not in str(with_token.model_dump(mode="json"))
    assert to_wire(with_token)["server"]["auth_token"] == TOKEN  # only on purpose, for the replicas


def test_short_or_missing_env_token_is_refused(monkeypatch):
    data = home_config()
    data["server"] = {"auth_token_env": "ORCH_UNSET_TOKEN_VAR"}
    monkeypatch.delenv("ORCH_UNSET_TOKEN_VAR", raising=False)
    with pytest.raises(ConfigError, match="ORCH_UNSET_TOKEN_VAR"):
        parse_config(data)
    data["server"] = {"auth_token": "short"}
    with pytest.raises(ConfigError, match="auth_token"):
        parse_config(data)


def test_cors_is_for_local_origins_only():
    data = home_config()
    data["server"] = {"cors_origins": ["https://evil.example"]}
    with pytest.raises(ConfigError, match="not a localhost origin"):
        parse_config(data)


def test_the_status_page_is_open_but_its_data_is_not():
    """The page's HTML holds no data, so it loads without the token (and under a route
    prefix); what it fetches still needs the token."""

    async def page(request):
        return JSONResponse({"page": True})

    routes = [Route("/ui", page), Route("/", page), Route("/v2/tasks", page), Route("/uix", page)]
    app = Starlette(routes=routes, middleware=[Middleware(AuthMiddleware, token=TOKEN, loopback_bypass=False)])
    for path in ("/ui", "/"):
        assert call(app, path, "10.1.2.3").status_code == 200, path
    for path in ("/v2/tasks", "/uix"):
        assert call(app, path, "10.1.2.3").status_code == 401, path

    async def prefixed(path: str):
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555), root_path="/orch")
        async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
            return await client.get(path)

    assert asyncio.run(prefixed("/orch/ui")).status_code == 200
    assert asyncio.run(prefixed("/orch/v2/tasks")).status_code == 401
