"""Tenant security: an auth walk of every documented route for each scope, constant-time
key checks, hostile names and metadata, a key revoked mid-stream, tenant isolation (404,
never 403), and no key in any log of the run."""

from __future__ import annotations

import inspect
import re
import sys
import time
from pathlib import Path

import httpx
import pytest

from orch.serve.auth import AuthMiddleware
from orch.tenants import cache as cache_module
from tests.conftest import home_config, parse_sse
from tests.unit.test_keys_http import TOKEN, App

SCOPE_SETS = ({"infer"}, {"catalog"}, {"admin"}, {"infer", "catalog"})


def concrete(path: str) -> str:
    return re.sub(r"{[^}]+}", "x1", path)


def test_keys_are_checked_in_constant_time():
    source = inspect.getsource(cache_module.KeyCache.resolve)
    assert "keyhash.matches" in source and "==" not in source
    assert "hmac.compare_digest" in inspect.getsource(sys.modules["orch.tenants.keyhash"].matches)
    assert "looks_like_key" in inspect.getsource(AuthMiddleware.__call__)


def test_injection_attempts_in_names_and_metadata_are_stored_verbatim(tmp_path):
    app = App(tmp_path)
    try:
        for count, hostile in enumerate(["x'); DROP TABLE keys; --", "\" OR \"1\"=\"1", "name', scopes='[\"admin\"]",
                                         "team-a' OR tenant LIKE '%"], start=1):
            created = app.create(name=hostile, metadata={"note": hostile, hostile: [hostile]}, scopes=["infer"])
            shown = app.call("GET", f"/v2/keys/{created['key_id']}").json()
            assert shown["name"] == hostile and shown["metadata"] == {"note": hostile, hostile: [hostile]}
            assert shown["scopes"] == ["infer"]
            assert app.call("GET", "/v2/keys", created["key"]).status_code == 403  # still no admin scope
            assert len(app.call("GET", "/v2/keys").json()["keys"]) == count
            assert app.call("GET", "/v2/keys", params={"tenant": hostile}).json() == {"keys": []}
    finally:
        app.store.close()


# --------------------------------------------------------------------------- deployed


SECRETS: list[str] = [TOKEN]


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenant-security")
    config = home_config()
    config["server"] = {"auth_token": TOKEN, "loopback_bypass": False}
    config["tenants"] = {"declared": [{"id": "team-a"}, {"id": "team-b"}], "key_store": str(root / "keys.sqlite")}
    config["artifacts"] = {"root": str(root / "artifacts")}
    client = deploy(config, name="orch-tenant-security", route_prefix="/tenant-security")
    return client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(client: httpx.Client, tenant: str, **fields) -> dict:
    created = client.post("/v2/keys", json={"tenant": tenant, **fields}, headers=bearer(TOKEN))
    assert created.status_code == 201, created.text
    SECRETS.append(created.json()["key"])
    return created.json()


def run_to_end(client: httpx.Client, key: str, **task) -> tuple[dict, list]:
    admitted = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 4, **task},
                           headers=bearer(key))
    assert admitted.status_code == 202, admitted.text
    with client.stream("GET", admitted.json()["streams"]["sse"], headers=bearer(key)) as stream:
        events = parse_sse(stream.iter_lines())
    assert events[-1][1] == "end", events[-1]
    return admitted.json(), events


@pytest.mark.integration
def test_auth_walk_every_documented_route_for_each_scope(service, tmp_path):
    """Each key gets 403 FORBIDDEN naming the scope on exactly the routes outside its scopes,
    never a 401 or 403 inside them; a revoked key gets 401 everywhere but the open paths."""
    local = App(tmp_path)  # the same routes in process: what scope each declares
    needed = {(route.method, route.path): route.scope for route in local.app.state.api_routes}
    local.store.close()
    document = service.get("/openapi.json", headers=bearer(TOKEN)).json()
    keys = {frozenset(scopes): new_key(service, "team-a", scopes=sorted(scopes))["key"] for scopes in SCOPE_SETS}
    revoked = new_key(service, "team-a", scopes=["infer", "catalog", "admin"])
    assert service.post(f"/v2/keys/{revoked['key_id']}/revoke", headers=bearer(TOKEN)).status_code == 200
    walked = 0
    for path, operations in document["paths"].items():
        for method in operations:
            scope = needed[(method.upper(), path)]
            for scopes, key in keys.items():
                answer = service.request(method.upper(), concrete(path), headers=bearer(key), json={})
                if scope is None or scope in scopes:
                    assert answer.status_code not in (401, 403), (method, path, scopes, answer.text)
                else:
                    assert answer.status_code == 403, (method, path, scopes, answer.text)
                    assert f"'{scope}'" in answer.text and "FORBIDDEN" in answer.text
                assert key not in answer.text
            if path != "/healthz":
                answer = service.request(method.upper(), concrete(path), headers=bearer(revoked["key"]), json={})
                assert answer.status_code == 401, (method, path, answer.text)
            walked += 1
    assert walked >= 35
    assert {needed[("POST", "/v2/tasks")], needed[("POST", "/v1/chat/completions")]} == {"infer"}
    assert needed[("POST", "/v2/catalog/models")] == "catalog" and needed[("POST", "/v2/keys")] == "admin"
    assert needed[("POST", "/v2/pools/{pool_id}/drain")] == "admin"


@pytest.mark.integration
def test_a_tenants_tasks_sessions_artifacts_and_transcripts_are_404_to_another_tenant(service):
    a, b = new_key(service, "team-a")["key"], new_key(service, "team-b")["key"]
    admitted, events = run_to_end(service, a, session_id="chat-1")
    task_id, transcript = admitted["task_id"], events[-1][2]["transcript_id"]
    assert task_id.startswith("team-a:")
    posted = service.post("/v2/artifacts", json={"kind": "plan", "content": {"step": 1}}, headers=bearer(a)).json()
    own = [f"/v2/tasks/{task_id}/events", f"/v2/tasks/{task_id}/trace", "/v2/sessions/chat-1",
           f"/v2/artifacts/{transcript}", f"/v2/artifacts/{posted['id']}"]
    for path in own:
        assert service.get(path, headers=bearer(a)).status_code == 200, path
        assert service.get(path, headers=bearer(TOKEN)).status_code == 200 or "/sessions/" in path, path
        hidden = service.get(path, headers=bearer(b))
        assert hidden.status_code == 404 and hidden.json()["code"] == "NOT_FOUND", (path, hidden.text)
    assert service.get(f"/v2/sessions/{task_id.split(':')[0]}:chat-1", headers=bearer(b)).status_code == 404
    assert service.get("/v2/sessions/team-a:chat-1", headers=bearer(TOKEN)).status_code == 200
    for method, path in (("POST", f"/v2/tasks/{task_id}/cancel"), ("DELETE", "/v2/sessions/chat-1")):
        assert service.request(method, path, headers=bearer(b)).status_code == 404
    assert service.get("/v2/sessions/chat-1", headers=bearer(a)).status_code == 200  # B's delete touched nothing
    # The same content posted by B is B's own artifact, with another id: no existence oracle.
    again = service.post("/v2/artifacts", json={"kind": "plan", "content": {"step": 1}}, headers=bearer(b)).json()
    assert again["id"] != posted["id"] and again["created"] is True


@pytest.mark.integration
def test_a_key_revoked_mid_stream_finishes_its_task_and_the_next_request_is_401(service):
    created = new_key(service, "team-a")
    key = created["key"]
    admitted = service.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True},
                            headers=bearer(key))
    assert admitted.status_code == 202, admitted.text
    kinds_after_revoke: list[str] = []
    revoked_at = None
    with service.stream("GET", admitted.json()["streams"]["sse"], headers=bearer(key)) as stream:
        for event in parse_sse(stream.iter_lines()):
            if revoked_at is None and event[1] == "token":
                response = service.post(f"/v2/keys/{created['key_id']}/revoke", headers=bearer(TOKEN))
                assert response.status_code == 200
                revoked_at = time.monotonic()
                refused = service.post("/v2/tasks", json={"prompt": "x", "max_tokens": 1}, headers=bearer(key))
                assert refused.status_code == 401, refused.text
            elif revoked_at is not None:
                kinds_after_revoke.append(event[1])
    assert kinds_after_revoke[-1] == "end" and "token" in kinds_after_revoke
    assert service.get(admitted.json()["streams"]["sse"], headers=bearer(key)).status_code == 401


@pytest.mark.integration
def test_no_key_secret_reaches_any_log_of_the_run(service):
    """Runs last in this module: every key it created (and the bootstrap token) is absent
    from the Ray session's logs, the orchestrator's included."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    assert len(SECRETS) > 1

    def leaks() -> dict[str, int]:
        found = {}
        for path in logs.rglob("*"):
            if path.is_file():
                text = path.read_text(errors="replace")
                hits = sum(secret in text for secret in SECRETS)
                if hits:
                    found[str(path)] = hits
        return found

    time.sleep(1.0)  # the last lines of the run are flushed by now
    assert leaks() == {}
    assert any("audit: create key" in path.read_text(errors="replace") for path in logs.rglob("worker-*")
               if path.is_file())  # the scan reads the replicas' logs
