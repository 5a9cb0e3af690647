"""The v2 task API end to end: real Serve HTTP, real pool actor, real llama.cpp on SmolLM2."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from orch.pools.actor import pool_handle
from tests.conftest import home_config, read_sse

pytestmark = pytest.mark.integration

NAMESPACE = "orch-it-tasks"


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config()
    config["namespace"] = NAMESPACE
    return deploy(config, name="orch-tasks", route_prefix="/")


def submit(client: httpx.Client, **body) -> httpx.Response:
    body.setdefault("prompt", "Once upon a time")
    body.setdefault("max_tokens", 16)
    return client.post("/v2/tasks", json=body)


def stream_all(client: httpx.Client, task_id: str) -> list[tuple[int, str, dict]]:
    with client.stream("GET", f"/v2/tasks/{task_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_sse(response)


def text_of(events) -> str:
    return "".join(data["t"] for _, kind, data in events if kind == "token")


def pool_counters() -> dict:
    return ray.get(pool_handle("default", NAMESPACE).detail.remote()).counters


def test_task_streams_started_tokens_end(client):
    response = submit(client, max_tokens=24, seed=11)
    assert response.status_code == 202, response.text
    admission = response.json()
    assert set(admission) >= {"task_id", "queue_position", "predicted_start_ms", "backoff_ms", "streams"}
    assert admission["streams"]["sse"] == f"/v2/tasks/{admission['task_id']}/events"

    events = stream_all(client, admission["task_id"])
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "started"
    assert kinds[-1] == "end"
    tokens = [data for _, kind, data in events if kind == "token"]
    assert len(tokens) >= 1
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    end = events[-1][2]
    assert end["tokens_out"] == len(tokens)
    assert end["finish_reason"] in {"length", "stop"}
    assert end["decode_time_ms"] >= 0
    assert [index for index, _, _ in events] == list(range(len(events)))
    started = events[0][2]
    assert started["seed"] == 11 and started["engine"] == "llamacpp" and started["pool_id"] == "default"


def test_same_seed_gives_identical_text(client):
    texts = []
    for _ in range(2):
        response = submit(client, prompt="List three colours:", max_tokens=32, seed=1234, temperature=1.0)
        assert response.status_code == 202
        texts.append(text_of(stream_all(client, response.json()["task_id"])))
    assert texts[0] and texts[0].encode() == texts[1].encode()


def test_correlation_id_echoed_and_generated(client):
    response = client.get("/healthz", headers={"X-Correlation-Id": "abc-123"})
    assert response.headers["x-correlation-id"] == "abc-123"
    generated = client.get("/healthz").headers["x-correlation-id"]
    assert len(generated) >= 16
    admitted = submit(client, max_tokens=4)
    with client.stream(
        "GET", f"/v2/tasks/{admitted.json()['task_id']}/events", headers={"X-Correlation-Id": "stream-7"}
    ) as response:
        assert response.headers["x-correlation-id"] == "stream-7"
        read_sse(response)
    bad = client.post("/v2/tasks", json={"max_tokens": 1}, headers={"X-Correlation-Id": "bad-9"})
    assert bad.headers["x-correlation-id"] == "bad-9"
    assert bad.json()["correlation_id"] == "bad-9"


def test_cancel_mid_stream_sends_no_token_after_it_returns(client):
    response = submit(client, prompt="Once upon a time", max_tokens=400, seed=3)
    task_id = response.json()["task_id"]
    cancel_result: dict = {}
    seen_at_cancel = threading.Event()

    def on_event(kind: str, data: dict) -> None:
        if kind == "token" and data["i"] == 3 and not seen_at_cancel.is_set():
            seen_at_cancel.set()

    def cancel_when_streaming() -> None:
        assert seen_at_cancel.wait(60)
        with httpx.Client(base_url=str(client.base_url), timeout=30) as other:
            result = other.post(f"/v2/tasks/{task_id}/cancel")
        cancel_result["status"] = result.status_code
        cancel_result["tokens_sent"] = int(result.headers["x-tokens-sent"])

    canceller = threading.Thread(target=cancel_when_streaming)
    canceller.start()
    with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
        events = read_sse(stream, on_event)
    canceller.join(60)

    assert cancel_result["status"] == 204
    tokens = [data for _, kind, data in events if kind == "token"]
    # Every token the stream carried was handed out before cancel returned, none after.
    assert len(tokens) == cancel_result["tokens_sent"]
    assert 4 <= len(tokens) < 400
    assert events[-1][1] == "end"
    assert events[-1][2]["finish_reason"] == "cancelled"
    assert events[-1][2]["tokens_out"] == len(tokens)
    # A stream opened after the cancel replays the same history, nothing more.
    replay = stream_all(client, task_id)
    assert [e for e in replay if e[1] == "token"] == [e for e in events if e[1] == "token"]


def test_cancel_before_attach_and_unknown(client):
    response = submit(client, max_tokens=200, seed=5)
    task_id = response.json()["task_id"]
    cancelled = client.post(f"/v2/tasks/{task_id}/cancel")
    assert cancelled.status_code == 204
    events = stream_all(client, task_id)
    tokens = [e for e in events if e[1] == "token"]
    # Tokens buffered before the cancel were never handed to a stream, so none are sent.
    assert int(cancelled.headers["x-tokens-sent"]) == 0
    assert tokens == []
    assert events[-1][1] == "end" and events[-1][2]["finish_reason"] == "cancelled"
    missing = client.post("/v2/tasks/no-such-task/cancel")
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"
    assert client.get("/v2/tasks/no-such-task/events").json()["code"] == "NOT_FOUND"


def test_over_context_is_refused_and_never_queued(client):
    before = pool_counters()["enqueued"]
    long_prompt = "word " * 2100
    response = submit(client, prompt=long_prompt, max_tokens=8)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "INVALID_PARAMS"
    assert "exceeds the context" in body["message"]
    near = submit(client, prompt="word " * 1100, max_tokens=1000)
    assert near.status_code == 400 and near.json()["code"] == "INVALID_PARAMS"
    too_wide = submit(client, ctx=100_000)
    assert too_wide.status_code == 400 and "maximum context" in too_wide.json()["message"]
    assert pool_counters()["enqueued"] == before


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"max_tokens": 4}, "prompt: required field is missing"),
        ({"prompt": "x"}, "max_tokens: required field is missing"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 4, "colour": "red"}, "colour: unknown field"),
        ({"prompt": "x", "max_tokens": 4, "priority": "urgent"}, "priority"),
        ({"prompt": "x", "max_tokens": 4, "seed": -1}, "seed"),
        ({"prompt": "x", "max_tokens": 4, "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "max_tokens": 4, "min_p": 1.5}, "min_p"),
        ({"prompt": "x", "max_tokens": 4, "ignore_eos": "sometimes"}, "ignore_eos"),
        ({"prompt": "x", "max_tokens": 4, "placement": {"pin_pool_id": "nowhere"}}, "names no pool"),
        ({"prompt": "x", "max_tokens": 4, "model_ref": "other-model"}, "no pool serves"),
        ([1, 2], "invalid request"),
    ],
)
def test_bad_requests_get_typed_errors(client, body, fragment):
    response = client.post("/v2/tasks", json=body)
    assert 400 <= response.status_code < 500 or response.status_code == 503, response.text
    payload = response.json()
    assert payload["code"] in {"INVALID_PARAMS", "POOL_UNAVAILABLE"}
    assert fragment in payload["message"]


def test_malformed_bodies(client):
    for content in (b"{not json", b"\xff\xfe", b""):
        response = client.post("/v2/tasks", content=content)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_PARAMS"
    huge = client.post("/v2/tasks", content=b"{" + b" " * 2_000_000 + b"}")
    assert huge.status_code == 400 and "exceeds the limit" in huge.json()["message"]
    assert client.get("/v2/tasks/bad%20id/events").status_code == 400
    assert client.get("/healthz").status_code == 200


def test_seed_system_full_form_is_accepted(client):
    response = client.post(
        "/v2/tasks",
        json={
            "task_id": "seedform-0001",
            "session_id": "11111111-1111-1111-1111-111111111111",
            "workload": "completion",
            "model_ref": "smollm2",
            "engine": "llamacpp",
            "ctx": 1024,
            "priority": "batch",
            "seed": 123456789,
            "determinism": "strict",
            "sampler_profile_version": "v1",
            "prompt": "Hello",
            "max_tokens": 8,
            "deadline_ms": 30000,
            "expected_tokens": 8,
            "kv_hint": "cold",
            "placement": {"mode": "pin", "pin_pool_id": "default"},
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["task_id"] == "seedform-0001"
    events = stream_all(client, "seedform-0001")
    assert events[-1][1] == "end"
    duplicate = client.post("/v2/tasks", json={"task_id": "seedform-0001", "prompt": "x", "max_tokens": 2})
    assert duplicate.status_code == 400 and "already in use" in duplicate.json()["message"]


def test_ignore_eos_runs_an_answer_that_would_end_to_max_tokens(client):
    prompt = "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n"

    def finish(**extra) -> dict:
        response = submit(client, prompt=prompt, max_tokens=24, temperature=0, seed=1, **extra)
        assert response.status_code == 202, response.text
        return stream_all(client, response.json()["task_id"])[-1][2]

    short = finish()
    assert short["finish_reason"] == "stop" and short["tokens_out"] < 24
    full = finish(ignore_eos=True, repetition_penalty=1.0, min_p=0.05)
    assert full["finish_reason"] == "length" and full["tokens_out"] == 24


def test_resume_with_last_event_id(client):
    response = submit(client, max_tokens=12, seed=8)
    task_id = response.json()["task_id"]
    full = stream_all(client, task_id)
    with client.stream("GET", f"/v2/tasks/{task_id}/events", headers={"Last-Event-ID": "2"}) as resumed:
        rest = read_sse(resumed)
    assert rest == full[3:]
