"""Run a callback on the pool's event loop from whatever thread is running: a slot's engine
thread, the loop itself, or a caller outside both (tests, the in-process benchmarks)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


def call_on(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """``callback(*args)`` soon on ``loop``: queued directly when called on it, through the
    loop's thread-safe wake-up otherwise (which costs a write to its self-pipe)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.call_soon(callback, *args)
    else:
        loop.call_soon_threadsafe(callback, *args)
