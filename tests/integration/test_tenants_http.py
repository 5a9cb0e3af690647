"""API keys through Serve's real HTTP proxy with two ingress replicas: a key works as an
OpenAI client's api_key, and a revocation reaches every replica within a second."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import home_config, openai_sdk

pytestmark = pytest.mark.integration

TOKEN = "tenants-it-bootstrap-token-42"
PROBES = 12  # answers per check: with two replicas, each is reached with near certainty


@pytest.fixture(scope="module")
def client(deploy, tmp_path_factory) -> httpx.Client:
    root = tmp_path_factory.mktemp("tenants-it")
    config = home_config()
    config["server"] = {"auth_token": TOKEN, "loopback_bypass": False}
    config["tenants"] = {"declared": [{"id": "team-a", "weight": 2}], "key_store": str(root / "keys.sqlite")}
    return deploy(config, name="orch-tenants-it", route_prefix="/tenants", num_replicas=2)


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def create(client: httpx.Client, **fields) -> dict:
    response = client.post("/v2/keys", json={"tenant": "team-a", **fields}, headers=admin())
    assert response.status_code == 201, response.text
    return response.json()


def answers(client: httpx.Client, key: str) -> set[int]:
    return {client.get("/v2/meta/version", headers={"Authorization": f"Bearer {key}"}).status_code
            for _ in range(PROBES)}


def test_a_key_is_an_openai_clients_api_key(client):
    import openai

    created = create(client, scopes=["infer"])
    sdk = openai_sdk(client).with_options(api_key=created["key"])
    chat = sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
    catalog_only = openai_sdk(client).with_options(api_key=create(client, scopes=["catalog"])["key"])
    with pytest.raises(openai.PermissionDeniedError) as denied:
        catalog_only.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])
    assert "'infer' scope" in str(denied.value)
    client.post(f"/v2/keys/{created['key_id']}/revoke", headers=admin())
    time.sleep(1.0)
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)


def test_a_revocation_reaches_every_replica_within_a_second(client):
    created = create(client, scopes=["infer"])
    key = created["key"]
    # Every replica knows the new key within a second too.
    deadline = time.monotonic() + 1.0
    while answers(client, key) != {200}:
        assert time.monotonic() < deadline, "a new key was not accepted by every replica within 1 s"
    revoked = client.post(f"/v2/keys/{created['key_id']}/revoke", headers=admin())
    assert revoked.status_code == 200
    start = time.monotonic()
    while answers(client, key) != {401}:
        assert time.monotonic() - start < 1.0, "a revoked key still worked on some replica after 1 s"
    took = time.monotonic() - start
    time.sleep(0.3)
    assert answers(client, key) == {401}, "a replica accepted the key again"
    assert took < 1.0
