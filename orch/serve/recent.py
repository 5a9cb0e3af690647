"""The status page's recent tasks, remembered by the ingress.

A pool keeps its tasks in its actor's memory, so a restarted pool starts with none: the
tasks it had vanished from its answers. The ingress remembers every row a pool answered
and keeps listing them: a finished task with its last state, a queued or running task
that its pool no longer reports as ``lost`` (the pool restarted, or dropped it with its
engine; its client got an error). Ids, state and progress only, never prompt text.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

#: Rows one replica remembers (the newest).
CAPACITY = 2000
UNFINISHED = ("queued", "running")
LOST = "lost"


class TaskBook:
    def __init__(self, capacity: int = CAPACITY, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.clock = clock
        #: task id -> (row as last answered, when it was admitted on this replica's clock)
        self._rows: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()

    def answered(self, pool_id: str, rows: list[dict[str, Any]], limit: int) -> None:
        """A pool's newest ``limit`` tasks, as it listed them now."""
        now = self.clock()
        listed = set()
        for row in rows:
            listed.add(row["task_id"])
            self._rows[row["task_id"]] = (dict(row), now - row["age_ms"] / 1000)
            self._rows.move_to_end(row["task_id"])
        # A full answer leaves out tasks older than its oldest row: those are not lost.
        oldest = min((now - row["age_ms"] / 1000 for row in rows), default=now) if len(rows) >= limit else None
        for task_id, (row, admitted) in self._rows.items():
            if row["pool_id"] != pool_id or task_id in listed or row["state"] not in UNFINISHED:
                continue
            if oldest is None or admitted >= oldest:
                row["state"], row["queue_position"] = LOST, None
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def newest(self, limit: int) -> list[dict[str, Any]]:
        """Every remembered row, newest first, its age as of now."""
        now = self.clock()
        rows = sorted(self._rows.values(), key=lambda item: item[1], reverse=True)[:limit]
        return [dict(row, age_ms=max(0, round((now - admitted) * 1000))) for row, admitted in rows]
