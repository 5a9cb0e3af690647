"""Faults the supervisor tests do not cover: an ingress replica killed under live streams,
and tasks that pass their deadline or whose engine stalls.

Each test states and checks the books: accepted tasks = completed + failed with a typed
error; none lost (every accepted task reaches exactly one terminal event), none duplicated
(event ids 0..n once each, counted by task id).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray

from tests.reliability.support import (
    FAST_RESTARTS,
    TaskLedger,
    follow,
    ingress_replicas,
    mock_pool,
    pool_snapshot,
    rooted,
    wait_for,
)

pytestmark = pytest.mark.integration

APP = "orch-rel-faults"
#: Streams open while a replica is killed (spread by Serve over both replicas).
LIVE_STREAMS = 8
#: Requests sent right after the kill, while Serve replaces the replica.
AFTER_KILL_REQUESTS = 12


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory):
    config = rooted({
        "version": 1,
        "supervision": FAST_RESTARTS,
        "pools": [
            mock_pool("steady", slots=LIVE_STREAMS + 4, capacity=64, tokens_per_s=40),
            mock_pool("stall", slots=4, capacity=16, tokens_per_s=50),
        ],
    }, tmp_path_factory.mktemp("faults"))
    client = deploy(config, name=APP, route_prefix="/rfaults", num_replicas=2)
    return client, APP


def submit(client: httpx.Client, pool: str, prompt: str = "one two three", **body) -> httpx.Response:
    body.setdefault("max_tokens", 8)
    return client.post("/v2/tasks", json={"prompt": prompt, "placement": {"pin_pool_id": pool}, **body})


def follow_in_threads(base_url: str, ledger: TaskLedger, task_ids: list[str], **options) -> list[threading.Thread]:
    def run(task_id: str) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as own:
            follow(own, ledger, task_id, **options)

    threads = [threading.Thread(target=run, args=(task_id,), daemon=True) for task_id in task_ids]
    for thread in threads:
        thread.start()
    return threads


def test_killing_one_of_two_ingress_replicas_loses_no_task(service):
    """Streams through the surviving replica go on; streams through the killed one break and
    resume on the survivor from their last event id; new requests are admitted; every
    accepted task ends exactly once."""
    client, namespace = service
    replicas = wait_for(lambda: len(ingress_replicas(APP)) == 2 and ingress_replicas(APP))
    ledger = TaskLedger()
    live = [ledger.accept(submit(client, "steady", max_tokens=120)) for _ in range(LIVE_STREAMS)]
    assert all(live), "the live tasks must be admitted"
    threads = follow_in_threads(str(client.base_url), ledger, live, read_timeout_s=20, budget_s=60)
    wait_for(lambda: pool_snapshot("steady", namespace)["active_slots"] == LIVE_STREAMS, 15)
    time.sleep(0.5)  # every stream has tokens in flight

    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    after_kill = []
    for _ in range(AFTER_KILL_REQUESTS):
        response = submit(client, "steady", max_tokens=4)
        after_kill.append(response.status_code)
        ledger.accept(response)
    threads += follow_in_threads(str(client.base_url), ledger, ledger.accepted[LIVE_STREAMS:], budget_s=30)
    for thread in threads:
        thread.join(90)
    books = ledger.assert_all_accounted()
    print(f"ingress kill: {books}; after-kill statuses {after_kill}")
    assert after_kill == [202] * AFTER_KILL_REQUESTS, after_kill
    assert books["completed"] == books["accepted"] == LIVE_STREAMS + AFTER_KILL_REQUESTS
    assert sum(books["broken_streams"].values()) >= 1, "some streams ran through the killed replica"
    # Serve replaces the replica; the service keeps two.
    wait_for(lambda: len(ingress_replicas(APP)) == 2 and replicas[0] not in ingress_replicas(APP), 60)
    assert client.get("/healthz").status_code == 200


def test_a_task_past_its_deadline_ends_with_decode_timeout(service):
    client, namespace = service
    ledger = TaskLedger()
    slow = ledger.accept(submit(client, "stall", max_tokens=400, deadline_ms=600))
    queued_late = [ledger.accept(submit(client, "stall", max_tokens=200, deadline_ms=300)) for _ in range(4)]
    for task_id in [slow, *queued_late]:
        follow(client, ledger, task_id, read_timeout_s=10, budget_s=20)
    books = ledger.assert_all_accounted()
    assert books["outcomes"].get("failed:DECODE_TIMEOUT") == 5, books
    assert all(ledger.events[t][-1][2]["retriable"] is True for t in ledger.accepted)
    wait_for(lambda: pool_snapshot("stall", namespace)["active_slots"] == 0, 10)


@pytest.mark.parametrize("fault", ["@fault=hang", "@fault=hang:3"], ids=["hung_from_the_start", "stalled_mid_stream"])
def test_a_hung_or_stalled_engine_ends_with_decode_timeout(service, fault):
    """A deadline is kept even when the engine emits nothing more: the pool's watchdog
    ends the task with DECODE_TIMEOUT, and the pool goes on serving."""
    client, namespace = service
    ledger = TaskLedger()
    deadline_ms = 800
    hung = ledger.accept(submit(client, "stall", prompt=f"stuck {fault}", max_tokens=50, deadline_ms=deadline_ms))
    assert hung
    began = time.monotonic()
    follow(client, ledger, hung, attempts=1, read_timeout_s=6, budget_s=deadline_ms / 1000 + 6)
    waited = time.monotonic() - began
    events = ledger.events[hung]
    assert events and events[-1][1] == "error", f"no terminal event {waited:.1f} s after a {deadline_ms} ms deadline: {events}"
    assert events[-1][2]["code"] == "DECODE_TIMEOUT" and events[-1][2]["retriable"] is True, events[-1]
    after = ledger.accept(submit(client, "stall", max_tokens=4))
    follow(client, ledger, after, budget_s=20)
    books = ledger.assert_all_accounted()
    assert books == dict(books, accepted=2, completed=1, failed_typed=1, lost=0)
