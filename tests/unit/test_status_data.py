"""What the status page reads besides the pools: the ingress's memory of recent tasks across a
pool restart, the live chart points, and a recovered pool's error text."""

from __future__ import annotations

import asyncio

from orch.observability.series import LiveSeries
from orch.pools.manager import PoolManager
from orch.serve.recent import TaskBook
from tests.conftest import mock_pool_config


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def row(task_id: str, state: str, age_ms: int, pool_id: str = "p") -> dict:
    return {"task_id": task_id, "pool_id": pool_id, "state": state, "priority": "interactive", "tokens_out": 1,
            "queue_position": 0 if state == "queued" else None, "age_ms": age_ms}


def test_tasks_outlive_their_pools_restart_and_unfinished_ones_read_lost():
    clock = Clock()
    book = TaskBook(clock=clock)
    book.answered("p", [row("run", "running", 100), row("wait", "queued", 50), row("done", "ended", 900)], limit=50)
    book.answered("q", [row("other", "running", 10, pool_id="q")], limit=50)
    clock.now += 2.0
    book.answered("p", [row("new", "queued", 5)], limit=50)  # restarted: an empty pool, one new task
    states = {r["task_id"]: (r["state"], r["queue_position"]) for r in book.newest(50)}
    assert states == {"new": ("queued", 0), "run": ("lost", None), "wait": ("lost", None), "done": ("ended", None),
                      "other": ("running", None)}
    ages = {r["task_id"]: r["age_ms"] for r in book.newest(50)}
    assert ages["done"] == 2900 and ages["new"] == 5  # ages keep counting on the ingress's clock
    assert [r["task_id"] for r in book.newest(2)] == ["new", "other"]


def test_a_full_answer_does_not_make_older_tasks_lost():
    book = TaskBook(clock=Clock())
    book.answered("p", [row("old", "queued", 500)], limit=1)
    book.answered("p", [row("young", "queued", 10)], limit=1)  # the limit cut "old" off, it is not lost
    assert {r["task_id"]: r["state"] for r in book.newest(10)} == {"young": "queued", "old": "queued"}


def test_the_book_is_bounded():
    book = TaskBook(capacity=3, clock=Clock())
    book.answered("p", [row(f"t{i}", "ended", 10 * i) for i in range(5)], limit=50)
    assert len(book.newest(50)) == 3


def test_live_series_points_per_second_and_pool():
    clock = Clock(5000.2)
    series = LiveSeries(history_s=60, clock=clock)
    series.tokens("p", 3)
    series.tokens("p", 2)
    series.first_token("p", 20.0)
    series.first_token("p", 30.0)
    series.queue_depths([("p", 4), ("q", 0)])
    clock.now += 1
    series.tokens("p", 7)
    clock.now += 100  # beyond the history asked for below
    read = series.read(seconds=60)
    assert read["pools"] == {"p": {"ago_s": [], "tokens_per_s": [], "ttft_ms": [], "queue_depth": []},
                             "q": {"ago_s": [], "tokens_per_s": [], "ttft_ms": [], "queue_depth": []}}
    clock.now -= 100
    p = series.read(seconds=60)["pools"]["p"]
    assert p == {"ago_s": [1, 0], "tokens_per_s": [5, 7], "ttft_ms": [25.0, None], "queue_depth": [4, None]}


def test_a_recovered_pool_does_not_say_it_is_restarting():
    async def scenario():
        manager = PoolManager(mock_pool_config("p"))
        manager.set_supervision_note("failed 1 time(s), restarting in 0.0 s; last cause: boom")
        before = manager.snapshot().last_error  # not Ready yet: the note is news
        await manager.start()
        after = manager.snapshot().last_error
        await manager.stop()
        return before, after

    before, after = asyncio.run(scenario())
    assert "restarting in" in before
    assert after is None
