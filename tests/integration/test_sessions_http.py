"""Sessions end to end: real Serve HTTP (two ingress replicas), the shared sessions actor,
and the real llama.cpp pool on SmolLM2 reporting each finished task's usage."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from orch.pools.actor import pool_handle
from tests.conftest import home_config, read_sse

pytestmark = pytest.mark.integration

NAMESPACE = "orch-sessions-it"
TOKENS = 64
TIME_MS = 600_000
COST = 1.0
PRICE_IN, PRICE_OUT = 1.0, 2.0
MAX_TURNS = 3
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config()
    config["namespace"] = NAMESPACE
    config["sessions"] = {
        "ttl_s": 600,
        "max_turns": MAX_TURNS,
        "budgets": {"tokens": TOKENS, "time_ms": TIME_MS, "cost": COST,
                    "cost_per_1k_tokens_in": PRICE_IN, "cost_per_1k_tokens_out": PRICE_OUT},
    }
    return deploy(config, name="orch-sessions-it", route_prefix="/sess", num_replicas=2)


def submit(client: httpx.Client, session_id: str, **body) -> httpx.Response:
    body.setdefault("prompt", PROMPT)
    body.setdefault("max_tokens", 6)
    return client.post("/v2/tasks", json=dict(body, session_id=session_id))


def run_turn(client: httpx.Client, session_id: str, **body) -> list[tuple[int, str, dict]]:
    response = submit(client, session_id, **body)
    assert response.status_code == 202, response.text
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
        events = read_sse(stream)
    assert events[-1][1] == "end", events[-1]
    return events


def used_tokens(events) -> int:
    started = next(data for _, kind, data in events if kind == "started")
    return started["prompt_tokens"] + events[-1][2]["tokens_out"]


def session(client: httpx.Client, session_id: str) -> dict:
    response = client.get(f"/v2/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


def settled(client: httpx.Client, session_id: str, tokens_left: int, timeout_s: float = 10.0) -> dict:
    """The session once the pool has reported usage down to ``tokens_left`` (usage arrives
    just after the stream's end event, from the pool's finish listener)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = session(client, session_id)
        if info["budgets"]["tokens"] <= tokens_left or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def pool_counters() -> dict:
    return ray.get(pool_handle("default", NAMESPACE).detail.remote()).counters


def test_first_use_creates_the_session_and_usage_is_charged(client):
    missing = client.get("/v2/sessions/story-1")
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"

    first = run_turn(client, "story-1")
    info = settled(client, "story-1", TOKENS - used_tokens(first))
    assert info["turns"] == 1 and info["max_turns"] == MAX_TURNS
    assert info["kv_bytes"] == 0 and info["kv_warmth"] is False and info["last_pool_id"] == "default"
    assert 590_000 < info["ttl_ms_remaining"] <= 600_000
    budgets = info["budgets"]
    assert budgets["tokens"] == TOKENS - used_tokens(first)
    end = first[-1][2]
    assert TIME_MS - end["decode_time_ms"] - 2000 <= budgets["time_ms"] <= TIME_MS - end["decode_time_ms"]
    started = first[0][2]
    spent = started["prompt_tokens"] * PRICE_IN / 1000 + end["tokens_out"] * PRICE_OUT / 1000
    assert budgets["cost"] == pytest.approx(COST - spent)

    second = run_turn(client, "story-1", max_tokens=4)
    info = settled(client, "story-1", TOKENS - used_tokens(first) - used_tokens(second))
    assert info["turns"] == 2
    assert info["budgets"]["tokens"] == TOKENS - used_tokens(first) - used_tokens(second)
    assert info["budgets"]["time_ms"] <= budgets["time_ms"] and info["budgets"]["cost"] < budgets["cost"]
    assert info["kv_warmth"] is True  # the same pool served both turns
    assert PROMPT not in client.get("/v2/sessions/story-1").text  # metadata only


def test_metrics_frames_carry_warmth_and_budgets_and_verbose_adds_a_sentence(client):
    first = run_turn(client, "story-m")
    frame = next(data for _, kind, data in first if kind == "metrics")
    prompt_tokens = first[0][2]["prompt_tokens"]
    assert frame["kv_warmth"] is False and frame["queue_position"] is None and frame["tokens_out"] == 0
    assert frame["budgets"]["tokens"] == TOKENS - prompt_tokens
    assert frame["budgets"]["cost"] == pytest.approx(COST - prompt_tokens * PRICE_IN / 1000)
    assert "human" not in frame  # the narration is for ?verbose=true
    left = TOKENS - used_tokens(first)
    settled(client, "story-m", left)

    response = submit(client, "story-m")
    task_id = response.json()["task_id"]
    assert response.json()["streams"]["sse_verbose"].endswith("?verbose=true")
    with client.stream("GET", response.json()["streams"]["sse_verbose"]) as stream:
        second = read_sse(stream)
    frame = next(data for _, kind, data in second if kind == "metrics")
    assert frame["kv_warmth"] is True  # the session's last turn ran on this pool
    assert frame["budgets"]["tokens"] == left - second[0][2]["prompt_tokens"]
    assert frame["human"].startswith("Generating on pool default") and "budget left" in frame["human"]
    assert task_id not in frame["human"] and "story-m" not in frame["human"]


def test_a_request_over_the_token_budget_is_refused_before_it_is_queued(client):
    events = run_turn(client, "story-2", max_tokens=8)
    left = TOKENS - used_tokens(events)
    assert settled(client, "story-2", left)["budgets"]["tokens"] == left
    before = pool_counters()

    response = submit(client, "story-2", max_tokens=left + 1)
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["code"] == "BUDGET_EXCEEDED" and body["retriable"] is False
    assert f"{left} of its {TOKENS} budget tokens left" in body["message"]
    assert f"lower max_tokens to at most {left}" in body["message"]
    after = pool_counters()
    assert after["enqueued"] == before["enqueued"] and after["rejected"] == before["rejected"]
    assert session(client, "story-2")["turns"] == 1  # a refusal is not a turn

    fits = run_turn(client, "story-2", max_tokens=2)
    assert settled(client, "story-2", left - used_tokens(fits))["budgets"]["tokens"] == left - used_tokens(fits)


def test_cancelled_turns_are_charged_too(client):
    response = submit(client, "story-3", max_tokens=30)
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    assert client.post(f"/v2/tasks/{task_id}/cancel").status_code == 204
    with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
        events = read_sse(stream)
    assert events[-1][2]["finish_reason"] == "cancelled"
    info = settled(client, "story-3", TOKENS - 1)
    assert info["budgets"]["tokens"] < TOKENS  # at least its prompt was charged


def test_max_turns(client):
    for _ in range(MAX_TURNS):
        run_turn(client, "story-4", max_tokens=2)
    before = pool_counters()["enqueued"]
    response = submit(client, "story-4", max_tokens=2)
    assert response.status_code == 429
    body = response.json()
    assert body["code"] == "BUDGET_EXCEEDED" and f"all {MAX_TURNS} of its turns" in body["message"]
    assert pool_counters()["enqueued"] == before
    assert session(client, "story-4")["turns"] == MAX_TURNS


def test_delete_then_get_is_not_found_and_the_id_starts_afresh(client):
    run_turn(client, "story-5", max_tokens=2)
    assert client.delete("/v2/sessions/story-5").status_code == 204
    gone = client.get("/v2/sessions/story-5")
    assert gone.status_code == 404 and gone.json()["code"] == "NOT_FOUND"
    assert client.delete("/v2/sessions/story-5").status_code == 404
    run_turn(client, "story-5", max_tokens=2)
    assert session(client, "story-5")["turns"] == 1
    assert client.get("/v2/sessions/bad%20id").status_code == 400
    assert client.get("/v2/sessions/never-used").status_code == 404


def test_every_replica_sees_the_same_session(client):
    from ray import serve

    status = serve.status().applications["orch-sessions-it"].deployments["orch-ingress"]
    assert status.replica_states.get("RUNNING") == 2
    for _ in range(MAX_TURNS):  # each admission may land on either replica
        assert submit(client, "story-6", max_tokens=2).status_code == 202
    views = set()
    for _ in range(30):
        info = session(client, "story-6")
        views.add((info["turns"], info["last_pool_id"], info["max_turns"]))
    assert views == {(MAX_TURNS, "default", MAX_TURNS)}
    refused = [submit(client, "story-6", max_tokens=2).status_code for _ in range(6)]
    assert refused == [429] * 6  # and every replica enforces the same limit


def test_sessions_are_documented(client):
    document = client.get("/openapi.json").json()
    assert {"get", "delete"} <= set(document["paths"]["/v2/sessions/{session_id}"])
    schemas = document["components"]["schemas"]
    assert {"SessionInfo", "SessionBudgets"} <= set(schemas)
    assert schemas["SessionInfo"]["properties"]["budgets"]["anyOf"][0] == {"$ref": "#/components/schemas/SessionBudgets"}


def test_an_idle_session_expires_after_its_ttl(deploy):
    config = home_config()
    config["sessions"] = {"ttl_s": 3, "budgets": {"tokens": 10_000}}
    short = deploy(config, name="orch-sessions-ttl-it", route_prefix="/sess-ttl")
    events = run_turn(short, "brief")
    first = settled(short, "brief", 10_000 - used_tokens(events))  # its last activity: the usage report
    assert first["budgets"] == {"tokens": 10_000 - used_tokens(events), "time_ms": None, "cost": None}
    assert first["max_turns"] == 8
    assert 0 < first["ttl_ms_remaining"] <= 3000
    time.sleep(0.3)
    assert session(short, "brief")["ttl_ms_remaining"] < first["ttl_ms_remaining"]
    deadline = time.monotonic() + 10
    while short.get("/v2/sessions/brief").status_code == 200:
        assert time.monotonic() < deadline, "the session never expired"
        time.sleep(0.1)
    gone = short.get("/v2/sessions/brief")
    assert gone.status_code == 404 and gone.json()["code"] == "NOT_FOUND"
