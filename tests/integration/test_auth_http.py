"""The auth seam through Serve's real HTTP proxy: every route needs the token."""

from __future__ import annotations

import re

import httpx
import pytest

from orch.config import ConfigError, parse_config
from orch.serve.deployment import build_application
from tests.conftest import home_config

pytestmark = pytest.mark.integration

TOKEN = "it-token-abcdefghijklmnop"


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config()
    config["server"] = {"auth_token": TOKEN, "loopback_bypass": False}
    return deploy(config, name="orch-auth", route_prefix="/auth")


def authed(client: httpx.Client) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_every_documented_route_refuses_requests_without_the_token(client):
    document = client.get("/openapi.json", headers=authed(client))
    assert document.status_code == 200
    walked = 0
    for path, operations in document.json()["paths"].items():
        concrete = re.sub(r"{[^}]+}", "x1", path)
        for method in operations:
            if path == "/healthz":
                continue
            for headers in ({}, {"Authorization": "Bearer wrong-token-000000"}, {"Authorization": TOKEN}):
                response = client.request(method.upper(), concrete, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers, response.text)
                assert TOKEN not in response.text
            walked += 1
    assert walked >= 12


def test_the_token_opens_the_api(client):
    assert client.get("/readyz").status_code == 401
    assert client.get("/readyz", headers=authed(client)).status_code == 200
    admitted = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 4}, headers=authed(client))
    assert admitted.status_code == 202
    with client.stream("GET", admitted.json()["streams"]["sse"].removeprefix(""), headers=authed(client)) as stream:
        assert stream.status_code == 200
        assert "event: end" in "".join(stream.iter_text())


def test_cors_is_off_by_default(client):
    response = client.get("/healthz", headers={"Origin": "http://localhost:3000"})
    assert "access-control-allow-origin" not in response.headers


def test_beyond_loopback_without_a_token_refuses_to_start(ray_session):
    config = home_config()
    config["server"] = {"host": "0.0.0.0"}
    with pytest.raises(ConfigError, match="no bearer token is configured"):
        build_application(parse_config(config))


def test_loopback_bypass_sees_the_real_client_address_through_the_proxy(deploy):
    config = home_config()
    config["server"] = {"auth_token": TOKEN, "loopback_bypass": True}
    client = deploy(config, name="orch-auth-bypass", route_prefix="/bypass")
    response = client.get("/v2/meta/version")
    assert response.status_code == 200, response.text
