"""Backpressure through real HTTP: a burst larger than the queue gets typed 429s, and every
task that was admitted completes."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import home_config, read_sse

pytestmark = pytest.mark.integration

CAPACITY = 4
BURST = 10 * CAPACITY


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config(queue={"capacity": CAPACITY, "policy": "reject"})
    config["namespace"] = "orch-it-burst"
    return deploy(config, name="orch-burst", route_prefix="/burst")


async def _burst(base_url: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return await asyncio.gather(
            *(client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 12, "seed": n})
              for n in range(BURST))
        )


def test_burst_over_capacity_gets_429_and_admitted_tasks_complete(client):
    responses = asyncio.run(_burst(str(client.base_url)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {202, 429}, statuses
    accepted = [r for r in responses if r.status_code == 202]
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, "a burst of 10x the queue capacity must meet backpressure"
    assert len(accepted) >= CAPACITY
    for response in rejected:
        assert int(response.headers["Retry-After"]) >= 1
        assert int(response.headers["X-Backoff-Ms"]) > 0
        body = response.json()
        assert body["code"] == "ADMISSION_REJECT"
        assert body["policy_label"] == "reject"
        assert body["retriable"] is True
        assert body["retry_after_ms"] == int(response.headers["X-Backoff-Ms"])
    for response in accepted:
        task_id = response.json()["task_id"]
        with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
            events = read_sse(stream)
        assert events[-1][1] == "end", events[-1]
        assert events[-1][2]["tokens_out"] == sum(1 for e in events if e[1] == "token")
    # After the burst drains the pool admits again.
    again = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 2})
    assert again.status_code == 202


def test_drop_lru_evicts_oldest_and_tells_its_stream(deploy):
    config = home_config(queue={"capacity": 2, "policy": "drop-lru"})
    config["namespace"] = "orch-it-droplru"
    client = deploy(config, name="orch-droplru", route_prefix="/droplru")
    body = {"prompt": "Once upon a time", "max_tokens": 300, "seed": 1}
    running = client.post("/v2/tasks", json=body).json()["task_id"]
    batch = [client.post("/v2/tasks", json=dict(body, priority="batch", max_tokens=4)) for _ in range(3)]
    assert [r.status_code for r in batch] == [202, 202, 202]
    first_batch = batch[0].json()["task_id"]
    with client.stream("GET", f"/v2/tasks/{first_batch}/events") as stream:
        events = read_sse(stream)
    assert [kind for _, kind, _ in events if kind != "metrics"] == ["error"]
    assert events[0][2]["code"] == "QUEUE_FULL_DROP_LRU" and events[0][2]["retriable"] is True
    client.post(f"/v2/tasks/{running}/cancel")
    for response in batch[1:]:
        with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
            assert read_sse(stream)[-1][1] == "end"
