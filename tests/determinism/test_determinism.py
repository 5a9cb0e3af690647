"""Determinism on the real llama.cpp engine: identical {prompt, params, seed, sampler
profile, engine version, model digest} give byte-identical token streams, on one replica
100 times out of 100, across a restart of the pool actor, and across the two replicas of
one replica set; a replica set never mixes engine versions."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from orch.core.placement import PoolView, place
from orch.api.tasks import PlacementOverrides
from orch.pools.actor import pool_handle
from tests.conftest import home_config, read_sse

pytestmark = pytest.mark.integration

REQUEST = {"prompt": "Once upon a time", "max_tokens": 24, "seed": 1234, "temperature": 0.9,
           "sampler_profile_version": "v1", "determinism": "strict"}


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config(replicas=2, queue={"capacity": 128, "policy": "reject"})
    config["supervision"] = {"backoff_base_s": 0.2, "backoff_max_s": 0.5}
    return deploy(config, name="orch-determinism", route_prefix="/det")


def stream(client: httpx.Client, pool: str) -> tuple[list[str], dict]:
    response = client.post("/v2/tasks", json=dict(REQUEST, placement={"pin_pool_id": pool}))
    assert response.status_code == 202, response.text
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as events:
        parsed = read_sse(events)
    started = next(data for _, kind, data in parsed if kind == "started")
    assert parsed[-1][1] == "end"
    return [data["t"] for _, kind, data in parsed if kind == "token"], started


def wait_ready(client: httpx.Client, pool: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get(f"/v2/pools/{pool}/health").json().get("ready"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{pool} not ready")


def test_one_replica_gives_the_same_stream_100_times(client):
    reference, started = stream(client, "default-0")
    assert len(reference) == REQUEST["max_tokens"]
    for _ in range(99):
        tokens, again = stream(client, "default-0")
        assert tokens == reference
        assert again["engine_version"] == started["engine_version"] and again["seed"] == started["seed"]


def test_two_replicas_of_one_set_agree(client):
    first, started_first = stream(client, "default-0")
    second, started_second = stream(client, "default-1")
    assert first == second
    assert started_first["engine_version"] == started_second["engine_version"]


def test_a_restarted_pool_actor_gives_the_same_stream(client):
    before, _ = stream(client, "default-1")
    ray.kill(pool_handle("default-1", "orch-determinism"), no_restart=True)
    time.sleep(0.5)
    wait_ready(client, "default-1")
    after, _ = stream(client, "default-1")
    assert after == before


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "mood": {"enum": ["happy", "sad", "calm"]}},
          "required": ["name", "mood"], "additionalProperties": False}


def test_a_strict_json_schema_request_gives_the_same_valid_json_every_time(client):
    """Constrained output is as reproducible as free text, amid other work and across replicas."""
    import json

    import jsonschema

    request = dict(REQUEST, prompt="A character as JSON:", max_tokens=48, json_schema=SCHEMA)

    def text(pool: str) -> str:
        response = client.post("/v2/tasks", json=dict(request, placement={"pin_pool_id": pool}))
        assert response.status_code == 202, response.text
        with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as events:
            parsed = read_sse(events)
        assert parsed[-1][1] == "end", parsed[-1]
        return "".join(data["t"] for _, kind, data in parsed if kind == "token")

    reference = text("default-0")
    jsonschema.validate(json.loads(reference), SCHEMA)
    assert [text("default-0") for _ in range(3)] == [reference] * 3
    assert text("default-1") == reference


def test_a_replica_set_refuses_a_member_on_another_engine_version():
    members = [
        PoolView("set-0", "llamacpp", "m", ready=True, replica_set="set", engine_version="0.3.36"),
        PoolView("set-1", "llamacpp", "m", ready=True, replica_set="set", engine_version="0.3.36"),
        PoolView("set-2", "llamacpp", "m", ready=True, replica_set="set", engine_version="0.3.37", vram_free_bytes=10**12),
    ]
    # The odd member has the most free VRAM, yet never gets the work.
    assert place(members).pool_id in ("set-0", "set-1")
    assert place(members, overrides=PlacementOverrides(pin_pool_id="set")).pool_id in ("set-0", "set-1")
    with pytest.raises(Exception, match="not Ready"):
        place(members, overrides=PlacementOverrides(pin_pool_id="set-2"))
