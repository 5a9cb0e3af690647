"""SSE ``metrics`` frames from the pool, without Ray: when they come, and what they say."""

from __future__ import annotations

import asyncio

import pytest

from orch.api.events import SSEMetrics
from orch.api.pools import TaskContext
from orch.api.tasks import TaskRequest
from orch.config import PoolConfig
from orch.pools import watchdog as watchdog_module
from orch.pools.manager import PoolManager
from tests.conftest import manager_events, mock_pool_config


def mock_pool(**overrides) -> PoolConfig:
    return mock_pool_config("m", **{"engine_options": {"tokens_per_s": 50}, **overrides})


async def events_of(manager: PoolManager, task_id: str, budget_s: float = 20.0) -> list[tuple[int, str, dict]]:
    return await manager_events(manager, task_id, budget_s)


def frames(events) -> list[dict]:
    return [data for _, kind, data in events if kind == "metrics"]


def test_a_running_task_gets_a_frame_at_start_and_about_every_second():
    async def scenario():
        manager = PoolManager(mock_pool())
        await manager.start()
        await manager.submit(TaskRequest(prompt="frames please", max_tokens=120, seed=1), "long")  # about 2.4 s
        events = await events_of(manager, "long")
        await manager.stop()
        return events

    events = asyncio.run(scenario())
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "started" and kinds[1] == "metrics" and kinds[-1] == "end"
    sent = frames(events)
    assert 2 <= len(sent) <= 5, len(sent)  # one at the start, then one a second
    for frame in sent:
        SSEMetrics.model_validate(frame)
        assert frame["queue_position"] is None and frame["queue_depth"] == 0 and frame["kv_warmth"] is False
        assert frame["on_time_probability"] is None  # no deadline
        assert "Generating on pool m" in frame["human"]
    counts = [frame["tokens_out"] for frame in sent]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] > 20


def test_on_time_probability_reflects_the_deadline_once_the_pool_has_measured():
    async def scenario():
        manager = PoolManager(mock_pool())
        await manager.start()
        await manager.submit(TaskRequest(prompt="warm up", max_tokens=20, seed=1), "warm")
        unmeasured = frames(await events_of(manager, "warm"))
        await manager.submit(TaskRequest(prompt="plenty of time", max_tokens=40, seed=2, deadline_ms=30_000), "easy")
        easy = frames(await events_of(manager, "easy"))
        await manager.submit(TaskRequest(prompt="no chance", max_tokens=400, seed=3, deadline_ms=1_500), "hard")
        hard = await events_of(manager, "hard")
        rate = manager.rates.tokens_per_s
        await manager.stop()
        return unmeasured, easy, hard, rate

    unmeasured, easy, hard, rate = asyncio.run(scenario())
    assert unmeasured[0]["on_time_probability"] is None and unmeasured[0]["tokens_per_s"] is None
    assert 30 < rate < 70, rate  # the mock decodes at 50 tokens/s
    assert easy[0]["on_time_probability"] > 0.95 and easy[0]["tokens_per_s"] > 0
    assert "likely to finish before the deadline" in easy[0]["human"]
    hard_frames = frames(hard)
    assert hard_frames[0]["on_time_probability"] < 0.05  # 400 tokens at ~50/s in 1.5 s
    assert hard[-1][1] == "error" and hard[-1][2]["code"] == "DECODE_TIMEOUT"


def test_a_queued_task_hears_its_position_and_session_budgets_shrink(monkeypatch):
    monkeypatch.setattr(watchdog_module, "QUEUED_METRICS_EVERY_S", 0.3)

    async def scenario():
        manager = PoolManager(mock_pool(queue={"capacity": 4}))
        await manager.start()
        await manager.submit(TaskRequest(prompt="blocker", max_tokens=60, seed=1), "blocker")  # about 1.2 s
        context = TaskContext(kv_warmth=True, budgets={"tokens": 500, "time_ms": None, "cost": 1.0},
                              prices={"in": 0.0, "out": 2.0})
        await manager.submit(TaskRequest(prompt="waiting", max_tokens=80, seed=2, session_id="s1"), "queued",
                             context=context)
        events = await events_of(manager, "queued")
        prompt_tokens = manager.tasks["queued"].prompt_tokens
        await manager.stop()
        return events, prompt_tokens

    events, prompt_tokens = asyncio.run(scenario())
    kinds = [kind for _, kind, _ in events]
    waiting = [frame for frame in frames(events) if frame["queue_position"] is not None]
    assert waiting and kinds.index("metrics") < kinds.index("started")
    assert waiting[0]["queue_position"] == 0 and waiting[0]["queue_depth"] == 1
    assert "position 1 of 1" in waiting[0]["human"]
    running = [frame for frame in frames(events) if frame["queue_position"] is None]
    assert all(frame["kv_warmth"] is True for frame in running)
    tokens_left = [frame["budgets"]["tokens"] for frame in running]
    assert tokens_left[0] == 500 - prompt_tokens and tokens_left[-1] < tokens_left[0]
    assert tokens_left == sorted(tokens_left, reverse=True)
    last = running[-1]
    assert last["budgets"]["tokens"] == 500 - prompt_tokens - last["tokens_out"]
    assert last["budgets"]["cost"] == pytest.approx(1.0 - last["tokens_out"] * 2.0 / 1000)
    assert "time_ms" not in last["budgets"]
