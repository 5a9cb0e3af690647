"""Prefix-aware placement over real HTTP with two real llama.cpp pools: a prompt that shares a
long prefix with an earlier one goes to the pool that ran it, says why in its ``started``
event, and shows as hit tokens in /metrics; a pin still wins."""

from __future__ import annotations

import copy

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import home_config, read_sse, wait_for

pytestmark = pytest.mark.integration

CONTEXT = ("The river town kept a ledger of every boat that passed: its name, its cargo, the hour it "
           "arrived and the hour it left. ") * 5  # ~560 bytes: several 64-byte blocks


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config(threads=1)
    second = copy.deepcopy(config["pools"][0])
    second["id"] = "second"
    config["pools"].append(second)
    client = deploy(config, name="orch-prefix-it", route_prefix="/pfx")
    # /readyz turns 200 with one ready pool; both must be candidates before placement is compared.
    wait_for(lambda: [p["ready"] for p in client.get("/readyz").json()["pools"].values()] == [True, True], timeout_s=60)
    return client


def run(client: httpx.Client, prompt: str, **fields) -> dict[str, dict]:
    """A task's events by kind (the first of each)."""
    response = client.post("/v2/tasks", json={"prompt": prompt, "max_tokens": 2, "seed": 1, **fields})
    assert response.status_code == 202, response.text
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
        events = read_sse(stream)
    found: dict[str, dict] = {}
    for _, kind, data in events:
        found.setdefault(kind, data)
    assert "end" in found, events
    return found


def hit_tokens(client: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "prefix_hit_tokens":
            for sample in family.samples:
                if sample.name == "prefix_hit_tokens_total":
                    out[sample.labels["pool_id"]] = sample.value
    return out


def reasons(client: httpx.Client) -> set[str]:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "placement_decisions":
            return {s.labels["reason"] for s in family.samples if s.name == "placement_decisions_total"}
    return set()


def test_a_shared_prefix_goes_where_it_is_cached_and_says_why(client):
    first = run(client, CONTEXT + "Which boat came first?")
    warm = first["started"]["pool_id"]
    assert first["started"]["placement"]["reason"] in ("least_loaded", "prefix_overlap")

    again = run(client, CONTEXT + "Which boat carried salt?")
    started = again["started"]
    assert started["pool_id"] == warm
    placement = started["placement"]
    assert placement["reason"] == "prefix_overlap" and placement["overlap_tokens"] > 50
    scores = {a["pool_id"]: a for a in placement["alternatives"]}
    assert set(scores) == {"default", "second"}
    cold = ({"default", "second"} - {warm}).pop()
    assert scores[warm]["score_ms"] < scores[cold]["score_ms"] and scores[cold]["overlap_tokens"] == 0
    assert again["metrics"]["kv_warmth"] is True

    assert wait_for(lambda: hit_tokens(client).get(warm, 0) > 50, timeout_s=10)
    assert hit_tokens(client).get(cold, 0) == 0
    wait_for(lambda: "prefix_overlap" in reasons(client), timeout_s=10)  # counted once the ingress flushed

    pinned = run(client, CONTEXT + "Which boat left last?", placement={"mode": "pin", "pin_pool_id": cold})
    assert pinned["started"]["pool_id"] == cold and pinned["started"]["placement"]["reason"] == "pinned"
