"""PoolManager.recent_tasks on the mock engine, without Ray: newest first, states, queue
positions, the limit, and never a prompt."""

from __future__ import annotations

import asyncio

from orch.api.tasks import TaskRequest
from orch.config import PoolConfig
from orch.pools.manager import PoolManager


def mock_pool() -> PoolManager:
    config = PoolConfig.model_validate(dict(id="m", engine="mock", model="mock:model", num_gpus=0, allow_cpu=True,
                                            engine_options={"tokens_per_s": 200}))
    return PoolManager(config)


def request(**fields) -> TaskRequest:
    fields.setdefault("prompt", "a private prompt")
    fields.setdefault("max_tokens", 4)
    return TaskRequest.model_validate(fields)


async def until(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_states_positions_order_and_no_prompt():
    async def scenario():
        manager = mock_pool()
        await manager.start()
        await manager.submit(request(max_tokens=2), "done")
        await until(lambda: manager.tasks["done"].terminal)
        await manager.submit(request(max_tokens=2000), "running")
        await until(lambda: manager.tasks["running"].state == "running")
        await manager.submit(request(priority="batch"), "batch")
        await manager.submit(request(), "interactive")
        await manager.submit(request(), "cancelled-in-queue")
        await manager.cancel("cancelled-in-queue")
        rows = manager.recent_tasks(10)
        limited = manager.recent_tasks(2)
        await manager.cancel("running")
        after_cancel = {row["task_id"]: row["state"] for row in manager.recent_tasks(10)}
        await manager.stop()
        return rows, limited, after_cancel

    rows, limited, after_cancel = asyncio.run(scenario())
    assert [row["task_id"] for row in rows] == ["cancelled-in-queue", "interactive", "batch", "running", "done"]
    by_id = {row["task_id"]: row for row in rows}
    assert by_id["done"]["state"] == "ended" and by_id["done"]["tokens_out"] == 2
    assert by_id["running"]["state"] == "running" and by_id["running"]["queue_position"] is None
    assert by_id["interactive"] | {"age_ms": 0} == {"task_id": "interactive", "pool_id": "m", "state": "queued",
                                                    "priority": "interactive", "tokens_out": 0, "queue_position": 0,
                                                    "age_ms": 0}
    assert by_id["batch"]["queue_position"] == 1  # interactive work goes first
    assert by_id["cancelled-in-queue"]["state"] == "cancelled"
    assert by_id["cancelled-in-queue"]["queue_position"] is None
    assert all(row["age_ms"] >= 0 for row in rows)
    assert "private" not in repr(rows)
    assert [row["task_id"] for row in limited] == ["cancelled-in-queue", "interactive"]
    assert after_cancel["running"] == "cancelled"


def test_an_error_ends_as_error_and_an_empty_pool_lists_nothing():
    async def scenario():
        manager = mock_pool()
        await manager.start()
        empty = manager.recent_tasks(5)
        await manager.submit(request(prompt="boom @fault=error:1"), "failing")
        await until(lambda: manager.tasks["failing"].terminal)
        rows = manager.recent_tasks(5)
        await manager.stop()
        return empty, rows

    empty, rows = asyncio.run(scenario())
    assert empty == []
    assert [(row["task_id"], row["state"]) for row in rows] == [("failing", "error")]
