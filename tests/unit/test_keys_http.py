"""The key admin routes and the auth seam with keys, on the real app in process (no Ray:
the key store is a local sqlite file behind the same cache the replicas use)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from orch.config import parse_config
from orch.serve.app import build_app
from orch.serve.registry import PoolRegistry
from orch.serve.state import IngressState
from orch.tenants.cache import KeyCache
from orch.tenants.store import KeyStore, LocalKeys
from tests.conftest import home_config

TOKEN = "bootstrap-token-for-keys-0123"
REMOTE = "10.0.0.7"


class App:
    def __init__(self, tmp_path, bypass: bool = False, token: str | None = TOKEN) -> None:
        config = home_config()
        config["server"] = {"loopback_bypass": bypass, **({"auth_token": token} if token else {})}
        config["tenants"] = {"declared": [{"id": "team-a", "weight": 2}, {"id": "team-b"}],
                             "key_store": str(tmp_path / "keys.sqlite")}
        parsed = parse_config(config)
        self.store = KeyStore(parsed.tenants.key_store)
        self.cache = KeyCache(LocalKeys(self.store), parsed.tenants.weight)
        state = IngressState(parsed, PoolRegistry(parsed, {}, parsed.server.snapshot_ttl_s), extras={"keys": self.cache})
        self.app = build_app(state)

    def call(self, method: str, path: str, key: str | None = TOKEN, host: str = REMOTE, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}

        async def go():
            transport = httpx.ASGITransport(app=self.app, client=(host, 40123))
            async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
                return await client.request(method, path, headers=headers, **kw)

        return asyncio.run(go())

    def create(self, **fields) -> dict:
        response = self.call("POST", "/v2/keys", json={"tenant": "team-a", **fields})
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One app for the module (building its OpenAPI document takes a second)."""
    app = App(tmp_path_factory.mktemp("keys-http"))
    yield app
    app.store.close()


def test_an_admin_creates_lists_rotates_and_revokes_keys_and_each_action_is_audited(app, caplog):
    caplog.set_level(logging.DEBUG)
    created = app.create(name="notebook", scopes=["infer"], limits={"rpm": 60})
    key, key_id = created["key"], created["key_id"]
    assert key.startswith(f"orch_{key_id}_") and created["tenant"] == "team-a"
    listed = app.call("GET", "/v2/keys")
    assert listed.status_code == 200 and key_id in [k["key_id"] for k in listed.json()["keys"]]
    assert key not in listed.text and "hash" not in listed.text and "salt" not in listed.text
    assert app.call("GET", f"/v2/keys/{key_id}").json()["limits"]["rpm"] == 60
    assert app.call("GET", "/v2/meta/version", key).status_code == 200
    rotated = app.call("POST", f"/v2/keys/{key_id}/rotate").json()
    assert rotated["key_id"] == key_id and rotated["key"] != key
    assert app.call("GET", "/v2/meta/version", key).status_code == 401
    assert app.call("GET", "/v2/meta/version", rotated["key"]).status_code == 200
    revoked = app.call("POST", f"/v2/keys/{key_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None and "key" not in revoked.json()
    refused = app.call("GET", "/v2/meta/version", rotated["key"])
    assert refused.status_code == 401 and refused.json()["code"] == "UNAUTHORIZED"
    assert "revoked" in refused.json()["message"] and rotated["key"] not in refused.text
    openai_shaped = app.call("GET", "/v1/models", rotated["key"])
    assert openai_shaped.status_code == 401 and openai_shaped.json()["error"]["type"] == "authentication_error"
    assert app.call("POST", f"/v2/keys/{key_id}/rotate").status_code == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "orch.audit"]
    assert [line.split()[1] for line in lines] == ["create", "rotate", "revoke"]
    assert all(key_id in line and "token:" in line for line in lines)
    everything = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert "refused" in everything and key_id in everything
    assert key not in everything and rotated["key"] not in everything and TOKEN not in everything


def test_a_key_outside_its_scope_gets_403_naming_the_scope(app):
    infer = app.create(scopes=["infer"])["key"]
    refused = app.call("GET", "/v2/keys", infer)
    assert refused.status_code == 403 and refused.json()["code"] == "FORBIDDEN" and "'admin'" in refused.json()["message"]
    catalog_only = app.create(scopes=["catalog"])["key"]
    chat = app.call("POST", "/v1/chat/completions", catalog_only, json={"model": "m", "messages": []})
    assert chat.status_code == 403 and chat.json()["error"]["code"] == "FORBIDDEN"
    assert chat.json()["error"]["type"] == "permission_error"
    assert app.call("GET", "/v2/catalog/models", infer).status_code == 403


def test_model_and_priority_outside_the_key_are_403_before_anything_is_placed(app):
    key = app.create(models=["smollm2"], priority_ceiling="batch")["key"]
    for task, code in (({"prompt": "x", "max_tokens": 1, "model_ref": "other", "priority": "batch"}, "MODEL_NOT_ALLOWED"),
                       ({"prompt": "x", "max_tokens": 1, "model_ref": "smollm2"}, "PRIORITY_NOT_ALLOWED")):
        refused = app.call("POST", "/v2/tasks", key, json=task)
        assert refused.status_code == 403 and refused.json()["code"] == code, refused.text


def test_keys_must_name_a_declared_tenant(app):
    refused = app.call("POST", "/v2/keys", json={"tenant": "team-z"})
    assert refused.status_code == 400 and "team-z" in refused.json()["message"]
    assert "tenants.declared" in refused.json()["message"]
    assert app.call("POST", "/v2/keys", json={"tenant": "team-a", "scopes": ["root"]}).status_code == 400
    assert app.call("GET", "/v2/keys/000000000000").status_code == 404


def test_without_keys_and_with_the_loopback_bypass_nothing_changes(tmp_path):
    app = App(tmp_path, bypass=True)
    assert app.call("GET", "/v2/keys", key=None, host="127.0.0.1").status_code == 200
    assert app.call("GET", "/v2/meta/version", key="unused", host="127.0.0.1").status_code == 200
    assert app.call("GET", "/v2/meta/version", key=None).status_code == 401
    created = app.create(scopes=["infer"])
    # A key presented on loopback is still the key: its scopes apply, and revoked it is refused.
    assert app.call("GET", "/v2/keys", created["key"], host="127.0.0.1").status_code == 403
    app.call("POST", f"/v2/keys/{created['key_id']}/revoke", key=None, host="127.0.0.1")
    assert app.call("GET", "/v2/meta/version", created["key"], host="127.0.0.1").status_code == 401
    app.store.close()
