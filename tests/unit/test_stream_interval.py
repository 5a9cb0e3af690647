"""A stream joins its pool's shared, interval-spaced poll rounds only after its first output
token (orch/serve/service.py TaskStream), so the first token never waits on
``stream_interval_ms``; and the setting's bounds."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from orch.api.pools import PollResult
from orch.api.tasks import TaskRequest
from orch.config.schema import ServerConfig
from orch.serve.service import TaskStream
from tests.unit.test_poll_mux import mock_manager


class RecordingPools:
    """Hands out scripted pages and records whether each poll asked to go with the others."""

    def __init__(self, pages: list[PollResult]) -> None:
        self.pages = pages
        self.together: list[bool] = []

    async def poll(self, pool_id, task_id, cursor, wait_s, together=False, until_done=False):
        self.together.append(together)
        return self.pages.pop(0)


def test_a_stream_polls_alone_until_its_first_output_token():
    pages = [
        PollResult(events=((0, "started", {}),)),
        PollResult(events=((1, "token", {"t": "", "i": 0, "prompt_logprobs": []}),)),  # the prompt's, not output
        PollResult(events=((2, "token", {"t": "Hi", "i": 0}),)),
        PollResult(events=((3, "token", {"t": "!", "i": 1}),)),
        PollResult(events=((4, "end", {}),), done=True),
    ]
    pools = RecordingPools(pages)

    async def scenario():
        stream = TaskStream(pools, "t1", "p", 0)
        return [batch async for batch in stream.batches()]

    batches = asyncio.run(scenario())
    assert [event[1] for batch in batches for event in batch] == ["started", "token", "token", "token", "end"]
    assert pools.together == [False, False, False, True, True]


def test_stream_interval_defaults_to_100_ms_and_is_bounded():
    assert ServerConfig().stream_interval_ms == 100
    assert ServerConfig(stream_interval_ms=0).stream_interval_ms == 0
    for bad in (-1, 1001):
        with pytest.raises(ValidationError):
            ServerConfig(stream_interval_ms=bad)


def test_a_whole_answer_is_one_poll_that_waits_for_the_end():
    """A non-streaming request's stream (``whole``) asks the pool for the task's end: one
    call, answered with every token, against a mock pool decoding 200 tokens/s."""
    class Counting:
        def __init__(self, manager):
            self.manager = manager
            self.calls = 0

        async def poll(self, pool_id, task_id, cursor, wait_s, together=False, until_done=False):
            self.calls += 1
            return await self.manager.poll(task_id, cursor, wait_s, until_done)

    async def scenario(whole: bool):
        manager = mock_manager(slots=1, tokens_per_s=200)
        await manager.start()
        try:
            await manager.submit(TaskRequest.model_validate({"prompt": "tell a story", "max_tokens": 20}), "t1")
            pools = Counting(manager)
            stream = TaskStream(pools, "t1", "m", 0)
            stream.whole = whole
            events = [event async for batch in stream.batches() for event in batch]
            return pools.calls, events
        finally:
            await manager.stop()

    calls, events = asyncio.run(scenario(True))
    assert calls == 1
    assert sum(1 for _, kind, _ in events if kind == "token") == 20 and events[-1][1] == "end"
    stepwise, _ = asyncio.run(scenario(False))
    assert stepwise >= 10  # a streaming consumer gets the tokens as they come
