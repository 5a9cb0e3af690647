"""Per-key limits and usage through Serve's real HTTP proxy, on two ingress replicas and the
real llama.cpp pool: 429s with their headers on /v2 and /v1, a per-minute limit that holds
across replicas under concurrency, a slot freed by a cancel, and usage that matches the
tasks' real token counts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import home_config, wait_for

pytestmark = pytest.mark.integration

TOKEN = "limits-admin-token-abcdefghij"
NAMESPACE = "orch-limits"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(deploy, tmp_path_factory) -> Any:
    config = home_config()
    config["server"] = {"auth_token": TOKEN, "loopback_bypass": False}
    config["tenants"] = {"declared": [{"id": "acme"}, {"id": "beta"}],
                         "key_store": str(tmp_path_factory.mktemp("keys") / "keys.sqlite")}
    yield deploy(config, name=NAMESPACE, route_prefix="/limits", num_replicas=2)
    import ray

    from orch.tenants.actor import ACTOR_NAME as KEYS_ACTOR
    from orch.tenants.limiter import ACTOR_NAME as LIMITER_ACTOR

    for name in (LIMITER_ACTOR, KEYS_ACTOR):  # detached: they would outlive the module
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            pass


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_key(client: httpx.Client, tenant: str = "acme", **limits: Any) -> tuple[str, str]:
    created = client.post("/v2/keys", json={"tenant": tenant, "limits": limits}, headers=bearer(TOKEN))
    assert created.status_code == 201, created.text
    body = created.json()
    time.sleep(1.0)  # every replica's key cache follows the store within a second
    return body["key_id"], body["key"]


def submit(client: httpx.Client, key: str, **fields: Any) -> httpx.Response:
    return client.post("/v2/tasks", json={"prompt": PROMPT, "max_tokens": 2, **fields}, headers=bearer(key))


def test_over_the_limit_is_429_with_headers_and_the_limit_named(client):
    _, key = new_key(client, rpm=2)
    first, second = submit(client, key), submit(client, key)
    assert first.status_code == second.status_code == 202
    assert first.headers["RateLimit-Limit"] == "2" and first.headers["RateLimit-Remaining"] == "1"
    assert second.headers["RateLimit-Remaining"] == "0" and int(second.headers["RateLimit-Reset"]) > 0

    refused = submit(client, key)
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["code"] == "RATE_LIMITED" and body["policy_label"] == "rpm" and body["retriable"] is True
    retry = int(refused.headers["Retry-After"])
    assert 1 <= retry <= 60 and body["retry_after_ms"] == retry * 1000
    assert refused.headers["RateLimit-Limit"] == "2" and refused.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(refused.headers["RateLimit-Reset"]) <= 60

    # /v1: the same refusal in OpenAI's shape, and what the openai client raises
    v1 = client.post("/v1/completions", json={"model": "smollm2", "prompt": PROMPT, "max_tokens": 2},
                     headers=bearer(key))
    assert v1.status_code == 429 and "Retry-After" in v1.headers and v1.headers["RateLimit-Limit"] == "2"
    error = v1.json()["error"]
    assert error["code"] == "RATE_LIMITED" and error["type"] == "rate_limit_error" and error["policy_label"] == "rpm"
    import openai

    sdk = openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key=key, max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.completions.create(model="smollm2", prompt=PROMPT, max_tokens=2)
    assert raised.value.response.json()["error"]["policy_label"] == "rpm"
    metrics = client.get("/metrics", headers=bearer(TOKEN)).text
    assert 'tenant_rejections_total{reason="rpm",tenant="acme"} 3.0' in metrics  # /v2, /v1, the openai client


def test_a_per_minute_limit_holds_across_two_replicas_under_concurrency(client):
    _, key = new_key(client, rpm=5)
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda _: submit(client, key), range(16)))
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [202] * 5 + [429] * 11, [a.text for a in answers if a.status_code not in (202, 429)]
    assert {a.json()["policy_label"] for a in answers if a.status_code == 429} == {"rpm"}


def test_a_cancelled_task_frees_its_slot(client):
    _, key = new_key(client, max_concurrent=1)
    running = submit(client, key, max_tokens=1500, min_tokens=1500)
    assert running.status_code == 202, running.text
    refused = submit(client, key)
    assert refused.status_code == 429 and refused.json()["policy_label"] == "concurrency"
    task_id = running.json()["task_id"]
    assert client.post(f"/v2/tasks/{task_id}/cancel", headers=bearer(key)).status_code == 204
    # the pool settles the cancelled task with the limiter as it ends
    admitted = wait_for(lambda: (r := submit(client, key)).status_code == 202 and r, timeout_s=15, every_s=0.3)
    assert admitted.headers["RateLimit-Remaining"] == "0"


def test_usage_counts_the_real_tokens_per_key_and_tenant(client):
    key_id, key = new_key(client, tenant="beta", rpm=100)
    other_id, other = new_key(client, tenant="beta")
    spent_in = spent_out = 0
    for _ in range(2):
        answer = client.post("/v1/completions", json={"model": "smollm2", "prompt": PROMPT, "max_tokens": 3},
                             headers=bearer(key))
        assert answer.status_code == 200, answer.text
        assert answer.headers["RateLimit-Limit"] == "100"  # /v1 answers carry them too
        spent_in += answer.json()["usage"]["prompt_tokens"]
        spent_out += answer.json()["usage"]["completion_tokens"]

    def settled() -> Any:
        usage = client.get(f"/v2/keys/{key_id}/usage", headers=bearer(key))
        assert usage.status_code == 200, usage.text
        return usage.json() if usage.json()["tokens_out"] == spent_out else None

    usage = wait_for(settled, timeout_s=10, every_s=0.2)
    assert (usage["requests"], usage["tokens_in"], usage["tokens_out"]) == (2, spent_in, spent_out)
    assert usage["tenant"] == "beta" and usage["active_tasks"] == 0 and usage["rejections"] == 0
    assert usage["tenant_usage"]["tokens_out"] == spent_out
    # another key of the same tenant does not see it; the admin does
    assert client.get(f"/v2/keys/{key_id}/usage", headers=bearer(other)).status_code == 404
    assert client.get(f"/v2/keys/{other_id}/usage", headers=bearer(TOKEN)).json()["requests"] == 0
    metrics = client.get("/metrics", headers=bearer(TOKEN)).text
    assert f'tenant_tokens_out_total{{tenant="beta"}} {float(spent_out)}' in metrics
