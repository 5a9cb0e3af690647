"""An operator's hands on a pool: drain (with an optional deadline), undrain and purge.

Draining is a flag on top of the pool's lifecycle state (orch/pools/state.py): a draining
pool admits nothing new and runs what it has; past the deadline, what is left ends with a
retriable error so no client waits forever.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from orch.api.errors import ErrorCode
from orch.pools.core import PoolCore


class Control:
    def __init__(self, core: PoolCore) -> None:
        self.core = core
        self._background: set[asyncio.Task] = set()

    async def drain(self, deadline_ms: Optional[int]) -> dict[str, Any]:
        """Stop admitting; let queued and running work finish. Past the deadline, what is
        left ends with a retriable error so no client waits forever."""
        core = self.core
        core.draining = True
        core.drain_deadline_at = time.monotonic() + deadline_ms / 1000 if deadline_ms else None
        if deadline_ms:
            task = asyncio.create_task(self._enforce_deadline(deadline_ms / 1000))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return {"pool_id": core.pool_id, "draining": True, "queued": len(core.queue), "active": core.active_slots,
                "deadline_ms": deadline_ms}

    async def _enforce_deadline(self, seconds: float) -> None:
        core = self.core
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if len(core.queue) == 0 and core.active_slots == 0:
                return
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if not core.draining:
            return
        ended = core.end_tasks(ErrorCode.POOL_UNAVAILABLE, f"pool '{core.pool_id}' was drained by an operator "
                               "before this task finished; resubmit it", running_too=True)
        core.counts.add("failed", ended)

    async def undrain(self) -> None:
        self.core.draining = False
        self.core.drain_deadline_at = None

    async def purge(self) -> dict[str, Any]:
        """Drop every queued task (each gets a retriable error) and forget finished ones."""
        core = self.core
        purged = core.end_tasks(ErrorCode.POOL_UNAVAILABLE, f"removed from the queue of pool '{core.pool_id}' "
                                "by an operator purge; resubmit it")
        # Only records whose every event was handed to a stream: nobody can still be reading them.
        forgotten = [tid for tid, r in core.tasks.items() if r.terminal and r.handed_out >= len(r.events)]
        for task_id in forgotten:
            core.tasks.pop(task_id, None)
        core.counts.add("purged", purged)
        return {"pool_id": core.pool_id, "purged_queued": purged, "forgotten_finished": len(forgotten),
                "running": core.active_slots}
