"""Bursts of ten times the queue capacity, round after round: only 202 or a typed 429,
every 202 completes, nothing stays queued or running, and the pool process's memory comes
back to where it was. Under drop-lru, the dropped tasks are told so on their stream."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.reliability.support import (
    TaskLedger,
    follow,
    mock_pool,
    pool_pid,
    pool_snapshot,
    pool_task_state,
    rooted,
    rss_bytes,
    wait_for,
)

pytestmark = pytest.mark.integration

CAPACITY = 8
BURST = 10 * CAPACITY
ROUNDS = int(os.environ.get("ORCH_BURST_ROUNDS", "5"))
#: Seconds the burst pool keeps finished tasks for late readers: long enough to read every
#: stream of a round, short enough that the janitor empties the pool between measurements.
RETAIN_S = 3.0
#: Streams of a round read at once.
FOLLOWERS = 16
#: How far the pool process's RSS may end above its baseline. Both are read once the janitor
#: has dropped every finished task; the baseline after a warm-up burst and a first garbage
#: collection probe (imports, code paths, allocator arenas and Ray's own buffers are in
#: place by then). Leaks of task state are caught exactly by counting the records and
#: objects alive (below); the RSS bound only has to leave room for what CPython's allocator
#: and Ray's core worker keep: measured +1.9 to +3.9 MiB over five rounds (the second probe
#: included), flat after the first rounds (15 rounds: +0.3 MiB from round 6 to 15). A burst
#: round's records alone weigh about 0.4 MiB (about 13 KB per task with its events and
#: transcript).
RSS_TOLERANCE_BYTES = 8 * 1024 * 1024
#: Python objects the pool process may hold beyond its baseline after the rounds.
OBJECT_TOLERANCE = 2000
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory):
    config = rooted({
        "version": 1,
        "pools": [
            dict(mock_pool("burst", slots=2, capacity=CAPACITY, tokens_per_s=400), retain_finished_s=RETAIN_S),
            mock_pool("lru", slots=1, capacity=CAPACITY, policy="drop-lru", tokens_per_s=400),
        ],
    }, tmp_path_factory.mktemp("bursts"))
    client = deploy(config, name="orch-rel-bursts", route_prefix="/rbursts")
    return client, "orch-rel-bursts"


async def burst(base_url: str, pool: str, round_index: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                 limits=httpx.Limits(max_connections=BURST)) as client:
        return await asyncio.gather(*(
            client.post("/v2/tasks", json={"prompt": "burst of work", "max_tokens": 12, "seed": n + BURST * round_index,
                                           "placement": {"pin_pool_id": pool}})
            for n in range(BURST)))


def check_refusal(response: httpx.Response) -> None:
    assert int(response.headers["Retry-After"]) >= 1
    assert int(response.headers["X-Backoff-Ms"]) > 0
    body = response.json()
    assert body["code"] == "ADMISSION_REJECT" and body["retriable"] is True, body
    assert body["retry_after_ms"] == int(response.headers["X-Backoff-Ms"])


def run_round(client: httpx.Client, pool: str, round_index: int) -> tuple[TaskLedger, list[int]]:
    responses = asyncio.run(burst(str(client.base_url), pool, round_index))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {202, 429}, statuses
    ledger = TaskLedger()
    for response in responses:
        if ledger.accept(response) is None:
            check_refusal(response)
    # Read side by side: one after the other, the last streams of a round on a loaded machine
    # were reached after RETAIN_S and found their tasks already swept.
    with ThreadPoolExecutor(max_workers=FOLLOWERS) as readers:
        list(readers.map(lambda task_id: follow(client, ledger, task_id, budget_s=30), ledger.accepted))
    return ledger, statuses


def settled(pool: str, namespace: str) -> dict:
    return wait_for(lambda: (s := pool_snapshot(pool, namespace))["queue_depth"] == 0
                    and s["active_slots"] == 0 and s, 15)


def wait_for_sweep() -> None:
    """Until the janitor has dropped every finished task: it sweeps every RETAIN_S / 4, and
    its last sweep's list lives until the next one."""
    time.sleep(RETAIN_S * 1.5 + 1.0)


def test_repeated_bursts_get_202_or_typed_429_and_memory_returns(service):
    client, namespace = service
    pid = pool_pid("burst", namespace)
    run_round(client, "burst", 0)  # warm-up
    settled("burst", namespace)
    wait_for_sweep()
    baseline_state = pool_task_state("burst", namespace)
    baseline = rss_bytes(pid)
    figures = []
    for round_index in range(1, ROUNDS + 1):
        ledger, statuses = run_round(client, "burst", round_index)
        books = ledger.assert_all_accounted()
        assert books["completed"] == books["accepted"] >= CAPACITY, books
        assert statuses.count(429) > 0, "ten times the capacity at once must meet backpressure"
        settled("burst", namespace)
        figures.append((books["accepted"], statuses.count(429), rss_bytes(pid)))
    wait_for_sweep()
    after_state = pool_task_state("burst", namespace)
    after = rss_bytes(pid)
    counters = pool_snapshot("burst", namespace)["counters"]
    print(f"bursts: baseline {baseline / MiB:.1f} MiB, per round (accepted, 429, rss MiB) "
          f"{[(a, r, round(m / MiB, 1)) for a, r, m in figures]}, after {after / MiB:.1f} MiB, counters {counters}, "
          f"task state before {baseline_state} after {after_state}")
    assert after_state["tasks_kept"] == 0
    assert after_state["records_alive"] <= 2, after_state  # the slot workers' last task, at most one each
    assert after_state["python_objects"] - baseline_state["python_objects"] <= OBJECT_TOLERANCE, after_state
    assert after - baseline <= RSS_TOLERANCE_BYTES, (baseline, after)
    assert counters["enqueued"] == counters["completed"]


def test_drop_lru_bursts_tell_every_dropped_task(service):
    client, namespace = service
    before = pool_snapshot("lru", namespace)["counters"]
    ledger, statuses = run_round(client, "lru", 0)
    assert statuses == [202] * BURST, "drop-lru admits every newcomer and drops the oldest queued task"
    books = ledger.assert_all_accounted()
    dropped = books["outcomes"].get("failed:QUEUE_FULL_DROP_LRU", 0)
    assert books["completed"] + dropped == BURST, books
    assert dropped > 0 and books["completed"] >= CAPACITY, books
    for task_id in ledger.accepted:
        kind, data = ledger.events[task_id][-1][1:]
        if kind == "error":
            assert data["code"] == "QUEUE_FULL_DROP_LRU" and data["retriable"] is True
            # dropped before it started (a metrics frame may have told it its place meanwhile)
            assert [k for _, k, _ in ledger.events[task_id] if k != "metrics"] == ["error"]
    after = settled("lru", namespace)["counters"]
    assert after["dropped"] - before["dropped"] == dropped
    print(f"drop-lru burst: {BURST} admitted, {dropped} dropped, {books['completed']} completed")
