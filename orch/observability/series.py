"""The last minutes of each pool as one ingress replica saw them, one point a second: tokens
relayed, first-token times of the requests it served, and queue depth from the pool views
it read. The status page draws its live charts from these (``GET /v2/ui/series``).

Nothing here asks a pool anything: the points come from what the replica already does
(relaying streams, refreshing views), so an idle replica records nothing and a replica
only sees its own share of the traffic when there are several.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable, Optional

#: Seconds of history kept per pool.
HISTORY_S = 300


class _Second:
    __slots__ = ("at", "tokens", "ttft_sum", "ttft_count", "queue_depth")

    def __init__(self, at: int) -> None:
        self.at = at
        self.tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.queue_depth: Optional[int] = None


class LiveSeries:
    def __init__(self, history_s: int = HISTORY_S, clock: Callable[[], float] = time.time) -> None:
        self.history_s = history_s
        self.clock = clock
        self._pools: dict[str, deque[_Second]] = {}

    def _now(self, pool_id: str) -> _Second:
        at = int(self.clock())
        points = self._pools.get(pool_id)
        if points is None:
            points = self._pools[pool_id] = deque(maxlen=self.history_s)
        if not points or points[-1].at != at:
            points.append(_Second(at))
        return points[-1]

    def tokens(self, pool_id: str, count: int) -> None:
        if count:
            self._now(pool_id).tokens += count

    def first_token(self, pool_id: str, ms: float) -> None:
        point = self._now(pool_id)
        point.ttft_sum += ms
        point.ttft_count += 1

    def queue_depths(self, depths: Iterable[tuple[str, int]]) -> None:
        for pool_id, depth in depths:
            self._now(pool_id).queue_depth = depth

    def read(self, seconds: int = HISTORY_S) -> dict[str, Any]:
        """Per pool, one entry per second that had a point, oldest first: seconds ago, tokens
        per second, mean first-token ms (None without a first token that second) and the
        last queue depth seen (None when no view was read that second)."""
        now = int(self.clock())
        out: dict[str, Any] = {}
        for pool_id, points in sorted(self._pools.items()):
            rows = [[now - p.at, p.tokens, round(p.ttft_sum / p.ttft_count, 2) if p.ttft_count else None,
                     p.queue_depth] for p in points if now - p.at <= seconds]
            out[pool_id] = {"ago_s": [r[0] for r in rows], "tokens_per_s": [r[1] for r in rows],
                            "ttft_ms": [r[2] for r in rows], "queue_depth": [r[3] for r in rows]}
        return {"now": now, "seconds": seconds, "pools": out}
