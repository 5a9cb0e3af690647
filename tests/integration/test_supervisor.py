"""The supervisor on a real local Ray: restarts with backoff, circuit breaker, engine
failures, preload that does not fit, replica sets. Mock engines inject the faults."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from orch.pools.actor import pool_handle
from orch.pools.supervisor import supervisor_status
from tests.conftest import wait_for, read_sse

pytestmark = pytest.mark.integration

FAST_RESTARTS = {"backoff_base_s": 0.2, "backoff_max_s": 0.5, "breaker_failures": 3, "breaker_window_s": 60,
                 "breaker_cooloff_s": 600, "healthy_after_s": 1}


def mock_pool(pool_id: str, **options) -> dict:
    return {"id": pool_id, "engine": "mock", "model": f"mock-{pool_id}", "num_gpus": 0, "num_cpus": 0.1,
            "allow_cpu": True, "engine_options": {"tokens_per_s": 200, **options}, "queue": {"capacity": 16}}


@pytest.fixture(scope="module")
def cluster(deploy):
    config = {
        "version": 1,
        "supervision": FAST_RESTARTS,
        "pools": [
            mock_pool("steady"),
            mock_pool("flaky"),
            mock_pool("crashy", crash_on_load=True),
            mock_pool("huge", model_bytes=10**15),
            dict(mock_pool("set"), replicas=2),
        ],
    }
    client = deploy(config, name="orch-supervision", route_prefix="/sup")
    return client, "orch-supervision"




def health(client: httpx.Client, pool_id: str) -> dict:
    return client.get(f"/v2/pools/{pool_id}/health").json()


def submit(client: httpx.Client, pool: str, prompt: str = "one two three", **body) -> httpx.Response:
    body.setdefault("max_tokens", 8)
    return client.post("/v2/tasks", json={"prompt": prompt, "placement": {"pin_pool_id": pool}, **body})


def test_a_killed_pool_is_restarted_and_its_stream_gets_worker_reset(cluster):
    client, namespace = cluster
    wait_for(lambda: health(client, "flaky")["ready"])
    task = submit(client, "flaky", max_tokens=2000).json()["task_id"]
    with client.stream("GET", f"/v2/tasks/{task}/events") as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("event: token"):
                break
        ray.kill(pool_handle("flaky", namespace), no_restart=True)
        rest = "\n".join(lines)
    assert "event: error" in rest and '"code":"WORKER_RESET"' in rest and '"retriable":true' in rest
    assert "event: token" not in rest.split("event: error")[1]
    wait_for(lambda: health(client, "flaky")["ready"])
    assert supervisor_status(namespace)["flaky"]["restarts"] >= 1, supervisor_status(namespace)["flaky"]
    again = submit(client, "flaky")
    assert again.status_code == 202
    with client.stream("GET", f"/v2/tasks/{again.json()['task_id']}/events") as stream:
        assert read_sse(stream)[-1][1] == "end"


def test_an_engine_that_dies_on_every_start_opens_the_circuit(cluster):
    client, namespace = cluster
    status = wait_for(lambda: (s := supervisor_status(namespace).get("crashy")) and s["circuit_open"] and s, 60)
    restarts = status["restarts"]
    assert restarts <= FAST_RESTARTS["breaker_failures"]
    state = health(client, "crashy")
    assert state["ready"] is False
    refused = submit(client, "crashy")
    assert refused.status_code in (503,) and refused.json()["code"] in ("POOL_UNREADY", "POOL_UNAVAILABLE")
    time.sleep(2)  # no restart storm while the circuit is open
    assert supervisor_status(namespace)["crashy"]["restarts"] == restarts


def test_a_model_that_does_not_fit_fails_fast_with_the_numbers(cluster):
    client, _ = cluster
    state = wait_for(lambda: (h := health(client, "huge")) and h.get("last_error") and h)
    assert state["ready"] is False
    assert "needs about" in state["last_error"] and "GiB" in state["last_error"] and "host memory" in state["last_error"]


def test_a_fatal_engine_error_fails_queued_work_retriably_and_the_pool_comes_back(cluster):
    client, namespace = cluster
    wait_for(lambda: health(client, "flaky")["ready"])
    fatal = submit(client, "flaky", prompt="boom @fault=fatal:100", max_tokens=200).json()["task_id"]
    queued = [submit(client, "flaky", max_tokens=4).json()["task_id"] for _ in range(2)]
    with client.stream("GET", f"/v2/tasks/{fatal}/events") as stream:
        end = read_sse(stream)[-1]
    assert end[1] == "error" and end[2]["code"] == "WORKER_RESET" and end[2]["retriable"] is True
    for task_id in queued:
        with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
            kind, data = read_sse(stream)[-1][1:]
        assert kind == "end" or (kind == "error" and data["code"] == "WORKER_RESET" and data["retriable"])
    wait_for(lambda: health(client, "flaky")["ready"] and not health(client, "flaky").get("draining"), 30)


def test_a_replica_set_is_one_pin_and_several_pools(cluster):
    client, _ = cluster
    for member in ("set-0", "set-1"):
        wait_for(lambda m=member: health(client, m)["ready"])
    chosen = set()
    for _ in range(6):
        response = submit(client, "set", max_tokens=40)
        assert response.status_code == 202
        chosen.add(response.json()["pool_id"])
    assert chosen == {"set-0", "set-1"}  # queued work spreads over the members
    assert client.get("/v2/pools/set/health").status_code == 404  # health is per member
