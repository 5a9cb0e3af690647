"""Long polls of one pool's streams, sent together.

A batched engine hands every running sequence a token in the same step. Polled one stream at
a time, the ingress would then send the pool one Ray message per stream per step, and each
costs both processes CPU that the engine's threads need on a small machine. The streams'
polls that arrive in one turn of the event loop leave in one ``poll_many`` call instead, which
the pool answers as soon as any of them has news, with the news of all of them. A stream
whose page came back empty while others had tokens waits on in the next call (its own wait
has not run out), so it never sees a keepalive it would not have seen alone.

Rounds leave at most every ``interval_s`` (the server's ``stream_interval_ms``): the polls
that come back in between wait for the next round, so the pool's steps in between reach the
ingress in one page and each client in one write. Only streams that already have their
first token poll here, so no first token waits on the interval.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional, Sequence

from orch.api.pools import PollResult

#: Sends one round: (task id, cursor) pairs and the wait, to the pool's ``poll_many``.
Send = Callable[[Sequence[tuple[str, int]], float], Awaitable[list[PollResult]]]
#: The page a stream gets when its round's call failed with ``exc`` (None: ``exc`` is raised to it).
Lost = Callable[[BaseException, int], Optional[PollResult]]


@dataclass
class _Poll:
    task_id: str
    cursor: int
    deadline: float
    future: asyncio.Future = field(repr=False)


class PollMux:
    def __init__(self, send: Send, lost: Lost, interval_s: float = 0.0) -> None:
        self._send = send
        self._lost = lost
        self._interval_s = interval_s
        self._next_round_at = 0.0
        self._waiting: list[_Poll] = []
        self._flush_scheduled = False
        self._rounds: set[asyncio.Task] = set()  # held so that a running round is not collected

    async def poll(self, task_id: str, cursor: int, wait_s: float) -> PollResult:
        loop = asyncio.get_running_loop()
        entry = _Poll(task_id, cursor, time.monotonic() + wait_s, loop.create_future())
        self._queue(entry, loop)
        return await entry.future

    def _queue(self, entry: _Poll, loop: asyncio.AbstractEventLoop) -> None:
        self._waiting.append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            delay = self._next_round_at - loop.time()
            if delay > 0:
                loop.call_later(delay, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        entries = [entry for entry in self._waiting if not entry.future.done()]  # a gone stream is dropped
        self._waiting = []
        if entries:
            self._next_round_at = asyncio.get_running_loop().time() + self._interval_s
            task = asyncio.ensure_future(self._round(entries))
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)

    async def _round(self, entries: list[_Poll]) -> None:
        wait_s = max(0.0, min(entry.deadline for entry in entries) - time.monotonic())
        try:
            pages = await self._send([(entry.task_id, entry.cursor) for entry in entries], wait_s)
        except Exception as exc:
            for entry in entries:
                if entry.future.done():
                    continue
                page = self._lost(exc, entry.cursor)
                if page is None:
                    entry.future.set_exception(exc)
                else:
                    entry.future.set_result(page)
            return
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        for entry, page in zip(entries, pages):
            if entry.future.done():
                continue
            if page.events or page.done or page.error is not None or now >= entry.deadline:
                entry.future.set_result(page)
            else:
                self._queue(entry, loop)
