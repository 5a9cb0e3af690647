"""A pool's outcome counters, each kept once.

The labelled instruments (orch/observability/pool_metrics.py) already count admissions,
starts, cancels and refusals by priority or code; the snapshot's plain ``counters`` read
those totals from them instead of counting a second time. The rest are counted here.
"""

from __future__ import annotations

from typing import Any

from orch.observability.pool_metrics import LabeledCounter, PoolMetrics

#: Counted here only (no labelled instrument counts them).
PLAIN = ("completed", "failed", "dropped", "purged", "reloads", "reload_rollbacks")


class PoolCounts:
    def __init__(self, metrics: PoolMetrics) -> None:
        self.metrics = metrics
        self._plain = dict.fromkeys(PLAIN, 0)

    def add(self, name: str, amount: int = 1) -> None:
        self._plain[name] += amount

    def enqueued(self, priority: str) -> None:
        self.metrics.enqueued.inc(priority)

    def started(self, priority: str) -> None:
        self.metrics.started.inc(priority)

    def cancelled(self, priority: str) -> None:
        self.metrics.canceled.inc(priority)

    def rejected(self, code: str) -> None:
        self.metrics.rejected.inc(code)

    def to_dict(self) -> dict[str, Any]:
        m, plain = self.metrics, self._plain
        return {"enqueued": _total(m.enqueued), "started": _total(m.started), "completed": plain["completed"],
                "cancelled": _total(m.canceled), "rejected": _total(m.rejected), "failed": plain["failed"],
                "dropped": plain["dropped"], "purged": plain["purged"], "reloads": plain["reloads"],
                "reload_rollbacks": plain["reload_rollbacks"]}


def _total(counter: LabeledCounter) -> int:
    return int(sum(counter.to_dict().values()))
