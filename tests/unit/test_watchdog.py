"""The pool's watchdog, without Ray: deadlines are kept when the engine goes quiet, a stall
timeout ends a task whose engine produces nothing, queued tasks do not outlive their
deadline behind a hung slot, and an engine that keeps a slot after its task ended makes the
pool stop taking work (so the supervisor restarts it)."""

from __future__ import annotations

import asyncio
import time

from orch.api.tasks import TaskRequest
from orch.config import PoolConfig
from orch.pools.manager import PoolManager
from tests.conftest import manager_events, mock_pool_config


def mock_pool(**overrides) -> PoolConfig:
    return mock_pool_config("w", **overrides)


async def events_of(manager: PoolManager, task_id: str, budget_s: float = 20.0) -> list[tuple[int, str, dict]]:
    return await manager_events(manager, task_id, budget_s)


def test_a_hung_engine_ends_at_the_deadline_and_a_stuck_slot_fails_the_engine():
    async def scenario():
        manager = PoolManager(mock_pool(stuck_slot_grace_s=0.5, queue={"capacity": 4}))
        await manager.start()
        began = time.monotonic()
        await manager.submit(TaskRequest(prompt="stuck @fault=hang:2", max_tokens=50, deadline_ms=300), "hung")
        await manager.submit(TaskRequest(prompt="behind it", max_tokens=4, deadline_ms=600), "queued")
        hung = await events_of(manager, "hung")
        hung_ended = time.monotonic() - began
        queued = await events_of(manager, "queued")
        queued_ended = time.monotonic() - began
        for _ in range(40):  # the slot never comes back: within the grace the engine counts as hung
            if manager.engine_failed:
                break
            await asyncio.sleep(0.05)
        snapshot = manager.snapshot()
        counters = dict(manager.counters)
        await manager.stop()
        return hung, hung_ended, queued, queued_ended, snapshot, counters

    hung, hung_ended, queued, queued_ended, snapshot, counters = asyncio.run(scenario())
    assert [kind for _, kind, _ in hung].count("token") == 2
    assert hung[-1][1] == "error" and hung[-1][2]["code"] == "DECODE_TIMEOUT" and hung[-1][2]["retriable"] is True
    assert 0.3 <= hung_ended < 1.0, hung_ended
    assert [kind for _, kind, _ in queued] == ["error"] and queued[0][2]["code"] == "DECODE_TIMEOUT"
    assert "queued" in queued[0][2]["message"] and 0.6 <= queued_ended < 1.2, queued_ended
    assert snapshot.engine_failed is True and snapshot.ready is False
    assert "hung" in snapshot.last_error
    assert counters["failed"] == 2 and counters["completed"] == 0


def test_stall_timeout_ends_a_quiet_task_without_a_deadline_and_the_pool_serves_on():
    async def scenario():
        manager = PoolManager(mock_pool(slots=2, stall_timeout_s=0.3))
        await manager.start()
        await manager.submit(TaskRequest(prompt="quiet @fault=hang:1", max_tokens=50), "quiet")
        stalled = await events_of(manager, "quiet")
        await manager.submit(TaskRequest(prompt="next one", max_tokens=3), "next")
        after = await events_of(manager, "next")
        ready = manager.ready
        await manager.stop()
        return stalled, after, ready

    stalled, after, ready = asyncio.run(scenario())
    assert stalled[-1][1] == "error" and stalled[-1][2]["code"] == "DECODE_TIMEOUT"
    assert "stall_timeout_s" in stalled[-1][2]["message"]
    assert after[-1][1] == "end" and ready


def test_a_steady_task_is_left_alone():
    """Tokens keep coming faster than the stall timeout: the task runs to its end."""

    async def scenario():
        manager = PoolManager(mock_pool(stall_timeout_s=0.2, engine_options={"tokens_per_s": 50}))
        await manager.start()
        await manager.submit(TaskRequest(prompt="steady", max_tokens=30), "steady")
        events = await events_of(manager, "steady")
        await manager.stop()
        return events

    events = asyncio.run(scenario())
    assert events[-1][1] == "end" and events[-1][2]["tokens_out"] == 30
