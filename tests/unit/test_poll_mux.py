"""Streams' long polls to one pool sent together (orch/serve/poll_mux.py), and the pool's
``poll_many`` that answers them (mock engine, no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from orch.api.pools import PollResult
from orch.api.tasks import TaskRequest
from orch.config import PoolConfig
from orch.pools.manager import PoolManager
from orch.serve.poll_mux import PollMux


class FakePool:
    """Answers each round with the pages scripted for its task ids, recording the rounds."""

    def __init__(self, pages: dict[str, list[PollResult]]) -> None:
        self.pages = pages
        self.rounds: list[tuple[list[tuple[str, int]], float]] = []

    async def send(self, requests, wait_s):
        self.rounds.append((list(requests), wait_s))
        await asyncio.sleep(0.01)
        return [self.pages[task_id].pop(0) if self.pages[task_id] else PollResult() for task_id, _ in requests]


def token(cursor: int) -> PollResult:
    return PollResult(events=((cursor, "token", {"t": "x", "i": cursor}),))


def no_loss(exc, cursor):
    return None


def mock_manager(slots: int, tokens_per_s: float) -> PoolManager:
    """A pool over the mock engine, its first token at once."""
    return PoolManager(PoolConfig.model_validate(dict(
        id="m", engine="mock", model="mock-model", num_gpus=0, allow_cpu=True, ctx=512, slots=slots,
        engine_options={"tokens_per_s": tokens_per_s, "first_token_ms": 0})))


def test_polls_of_one_turn_leave_in_one_call_and_an_empty_page_waits_on():
    async def scenario():
        pool = FakePool({"a": [token(0)], "b": [PollResult(), token(3)]})
        mux = PollMux(pool.send, no_loss)
        a, b = await asyncio.gather(mux.poll("a", 0, 5.0), mux.poll("b", 3, 5.0))
        return pool.rounds, a, b

    rounds, a, b = asyncio.run(scenario())
    assert rounds[0][0] == [("a", 0), ("b", 3)]  # one call for both streams
    assert rounds[1][0] == [("b", 3)]  # b's empty page was not handed out: it waited on
    assert a.events[0][0] == 0 and b.events[0][0] == 3
    assert 4.5 < rounds[0][1] <= 5.0


def test_a_stream_whose_wait_ran_out_gets_its_empty_page():
    async def scenario():
        pool = FakePool({"a": []})
        mux = PollMux(pool.send, no_loss)
        return await asyncio.wait_for(mux.poll("a", 7, 0.05), 2.0), len(pool.rounds)

    page, rounds = asyncio.run(scenario())
    assert page.events == () and not page.done
    assert 1 <= rounds <= 20


def test_a_failed_round_ends_each_stream_with_its_lost_page_or_raises():
    class Boom(Exception):
        pass

    async def failing(requests, wait_s):
        raise Boom()

    async def scenario():
        lost = PollMux(failing, lambda exc, cursor: PollResult(events=((cursor, "error", {}),), done=True))
        page = await lost.poll("a", 4, 1.0)
        raising = PollMux(failing, no_loss)
        with pytest.raises(Boom):
            await raising.poll("a", 0, 1.0)
        return page

    page = asyncio.run(scenario())
    assert page.done and page.events == ((4, "error", {}),)


def test_a_cancelled_stream_leaves_the_next_round():
    async def scenario():
        pool = FakePool({"a": [PollResult(), token(0)], "b": [PollResult(), PollResult(), token(1)]})
        mux = PollMux(pool.send, no_loss)
        gone = asyncio.ensure_future(mux.poll("a", 0, 5.0))
        stays = asyncio.ensure_future(mux.poll("b", 1, 5.0))
        await asyncio.sleep(0.005)
        gone.cancel()
        await stays
        return pool.rounds

    rounds = asyncio.run(scenario())
    assert [task_ids for task_ids, _ in rounds] == [[("a", 0), ("b", 1)], [("b", 1)], [("b", 1)]]


def test_the_pools_poll_many_answers_when_any_task_has_news_with_every_tasks_news():
    async def scenario():
        manager = mock_manager(slots=2, tokens_per_s=50)
        await manager.start()
        request = TaskRequest.model_validate({"prompt": "tell a story", "max_tokens": 3})
        await manager.submit(request, "t1")
        empty = await manager.poll_many([], 0.0)
        pages = await manager.poll_many([("t1", 0)], 5.0)
        cursor = pages[0].events[-1][0] + 1
        pages += await manager.poll_many([("nobody", 0), ("t1", cursor)], 5.0)  # answered at once
        if pages[2].events:
            cursor = pages[2].events[-1][0] + 1
        rest = []
        for _ in range(100):
            page = (await manager.poll_many([("t1", cursor)], 5.0))[0]
            rest.extend(page.events)
            cursor = page.events[-1][0] + 1 if page.events else cursor
            if page.done:
                break
        await manager.stop()
        return empty, pages, rest

    empty, pages, rest = asyncio.run(scenario())
    assert empty == []
    assert pages[0].events[0][1] == "started" and pages[0].error is None
    assert pages[1].error is not None and pages[1].error.code == "NOT_FOUND"
    kinds = [kind for _, kind, _ in pages[0].events + pages[2].events + tuple(rest)]
    assert kinds.count("token") == 3 and kinds[-1] == "end"


def test_rounds_leave_at_most_every_interval_and_the_first_leaves_at_once():
    async def scenario():
        pool = FakePool({"a": [token(0), token(1), token(2)]})
        sent_at: list[float] = []

        async def send(requests, wait_s):
            sent_at.append(loop.time())
            return await pool.send(requests, wait_s)

        loop = asyncio.get_running_loop()
        mux = PollMux(send, no_loss, interval_s=0.1)
        started = loop.time()
        for cursor in range(3):
            await mux.poll("a", cursor, 5.0)
        return started, sent_at

    started, sent_at = asyncio.run(scenario())
    assert len(sent_at) == 3
    assert sent_at[0] - started < 0.05  # nothing before it: no wait
    assert all(later - earlier >= 0.095 for earlier, later in zip(sent_at, sent_at[1:]))


def test_with_an_interval_a_pools_tokens_arrive_several_to_a_page():
    """Against the real poll_many of a mock pool decoding 200 tokens/s: without an interval
    each page carries about one token; with 100 ms, most pages carry several."""

    async def pages_per_stream(interval_s: float) -> list[int]:
        manager = mock_manager(slots=1, tokens_per_s=200)
        await manager.start()
        try:
            await manager.submit(TaskRequest.model_validate({"prompt": "tell a story", "max_tokens": 40}), "t1")
            mux = PollMux(manager.poll_many, no_loss, interval_s=interval_s)
            sizes, cursor = [], 0
            for _ in range(400):
                page = await mux.poll("t1", cursor, 5.0)
                tokens = sum(1 for _, kind, _ in page.events if kind == "token")
                if tokens:
                    sizes.append(tokens)
                cursor = page.events[-1][0] + 1 if page.events else cursor
                if page.done:
                    return sizes
            raise AssertionError("the task did not end")
        finally:
            await manager.stop()

    every_step = asyncio.run(pages_per_stream(0.0))
    coalesced = asyncio.run(pages_per_stream(0.1))
    assert sum(every_step) == sum(coalesced) == 40  # nothing lost or repeated
    assert len(every_step) >= 20
    assert len(coalesced) <= 15 and max(coalesced) >= 5
