"""Deadlines kept even when the engine goes quiet, and a hung engine noticed.

The engine checks a task's deadline only when it emits a token, so a task whose engine
stops emitting (or a queued task behind it) would never end; here it ends with
DECODE_TIMEOUT. An engine that then keeps the slot past ``stuck_slot_grace_s`` is hung:
the pool stops taking work and the supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from orch.api.errors import ErrorCode
from orch.engines.base import EngineError
from orch.pools.core import PoolCore
from orch.pools.frames import Frames
from orch.pools.task_record import TaskRecord

log = logging.getLogger("orch.pool")

#: How often the watchdog looks at deadlines, stalled engines and stuck slots.
WATCHDOG_INTERVAL_S = 0.1
#: A queued task gets a ``metrics`` frame when it has waited this long, and again after as long.
QUEUED_METRICS_EVERY_S = 2.0


class Watchdog:
    def __init__(self, core: PoolCore, frames: Frames) -> None:
        self.core = core
        self.frames = frames

    async def run(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            try:
                self.once(time.monotonic())
            except Exception:  # the watchdog must outlive any one bad record
                log.exception("pool %s: watchdog pass failed", self.core.pool_id)

    def once(self, now: float) -> None:
        self._queued(now)
        self._slots(now)

    def _queued(self, now: float) -> None:
        core = self.core
        for record in list(core.tasks.values()):
            if record.state != "queued" or record.terminal:
                continue
            if record.deadline_at is not None and now >= record.deadline_at:
                core.queue.cancel(record.task_id)
                record.cancelled = True
                core.fail(record, ErrorCode.DECODE_TIMEOUT, "deadline passed while the task was queued",
                          retriable=True)
            elif now - (record.metrics_at or record.admitted_at) >= QUEUED_METRICS_EVERY_S:
                self.frames.push(record, now)

    def _slots(self, now: float) -> None:
        core = self.core
        grace = core.config.stuck_slot_grace_s
        for slot, record in list(core.running.items()):
            if not record.terminal:
                overdue = self._overdue(record, now)
                if overdue:
                    record.cancelled = True  # the engine stops at its next token, if it ever emits one
                    core.fail(record, ErrorCode.DECODE_TIMEOUT, overdue, retriable=True)
            elif record.finished_at is not None and now - record.finished_at > grace and not core.life.engine_failed:
                core.engine_fault(EngineError(
                    f"slot {slot} still runs task {record.task_id} {grace:g} s after it ended; the engine is hung",
                    fatal=True))

    def _overdue(self, record: TaskRecord, now: float) -> Optional[str]:
        if record.deadline_at is not None and now >= record.deadline_at:
            return f"deadline passed after {record.tokens_out} tokens; the engine produced nothing more in time"
        stall = self.core.config.stall_timeout_s
        quiet_since = record.last_event_at or record.started_at
        if stall is not None and quiet_since is not None and now - quiet_since > stall:
            return f"the engine produced nothing for {stall:g} s (stall_timeout_s) after {record.tokens_out} tokens"
        return None
