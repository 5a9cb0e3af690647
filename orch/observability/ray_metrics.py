"""The key pool series, also exported through ``ray.util.metrics`` from inside each pool
actor, so they appear in Ray's metrics export and dashboard (and the Grafana dashboard in
deployments/grafana-llama-orch.json) next to Ray's own.

The pool's counters are read every few seconds and the growth since the last read is
added to Ray's counters, so Ray's series match /metrics without a call per event.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from orch.api.pools import PoolSnapshot
from orch.observability.names import DECODE_BUCKETS_MS, FIRST_TOKEN_BUCKETS_MS

EXPORT_EVERY_S = 5.0
TAGS = ("pool_id", "engine", "priority")


class RayMetricsExporter:
    def __init__(self, snapshot: Callable[[], PoolSnapshot]) -> None:
        from ray.util import metrics

        self._snapshot = snapshot
        self._last: dict[tuple, float] = {}
        self._last_hist: dict[tuple, list[int]] = {}
        #: Export passes made (what ``status`` reports).
        self.exports = 0
        self.counters = {
            name: metrics.Counter(f"orch_{name}", description=text, tag_keys=TAGS)
            for name, text in (("tasks_enqueued_total", "Tasks admitted into a pool's queue"),
                               ("tasks_started_total", "Tasks that began running"),
                               ("tasks_canceled_total", "Tasks cancelled"),
                               ("tokens_out_total", "Tokens generated"))
        }
        self.queue_depth = metrics.Gauge("orch_queue_depth", description="Tasks waiting", tag_keys=TAGS)
        self.slots_active = metrics.Gauge("orch_slots_active", description="Slots running a task",
                                          tag_keys=("pool_id", "engine"))
        self.first_token = metrics.Histogram("orch_latency_first_token_ms", description="Admission to first token",
                                             boundaries=list(FIRST_TOKEN_BUCKETS_MS), tag_keys=TAGS)
        self.decode = metrics.Histogram("orch_latency_decode_ms", description="Start to end of a task",
                                        boundaries=list(DECODE_BUCKETS_MS), tag_keys=TAGS)

    def export_once(self) -> None:
        snap = self._snapshot()
        self.exports += 1
        view, detail = snap.view, snap.detail
        pool = {"pool_id": view.pool_id, "engine": view.engine}
        metrics = detail.metrics
        for name, key in (("tasks_enqueued_total", "enqueued"), ("tasks_started_total", "started"),
                          ("tasks_canceled_total", "canceled")):
            for priority, value in metrics.get(key, {}).items():
                self._add(name, dict(pool, priority=priority), value)
        self._add("tokens_out_total", dict(pool, priority="all"), metrics.get("tokens", {}).get("out", 0))
        for priority, depth in detail.queue_depth_by_priority.items():
            self.queue_depth.set(depth, tags=dict(pool, priority=priority))
        self.slots_active.set(view.active_slots, tags=pool)
        for histogram, key in ((self.first_token, "first_token_ms"), (self.decode, "decode_ms")):
            for priority, data in metrics.get(key, {}).items():
                self._observe_new(histogram, (key, priority), data, dict(pool, priority=priority))

    def _add(self, name: str, tags: dict[str, str], total: float) -> None:
        key = (name, tuple(sorted(tags.items())))
        grown = total - self._last.get(key, 0.0)
        if grown > 0:
            self.counters[name].inc(grown, tags=tags)
        self._last[key] = total

    def _observe_new(self, histogram, key: tuple, data: dict[str, Any], tags: dict[str, str]) -> None:
        """Replay the bucket growth since the last read (at each bucket's upper bound)."""
        before = self._last_hist.get(key, [0] * len(data["counts"]))
        bounds = list(data["buckets"]) + [data["buckets"][-1] * 2]
        for bound, now, then in zip(bounds, data["counts"], before):
            for _ in range(max(0, now - then)):
                histogram.observe(bound, tags=tags)
        self._last_hist[key] = list(data["counts"])

    def status(self) -> dict[str, Any]:
        """Export passes so far and each counter's exported total, per tag set."""
        return {"exports": self.exports,
                "totals": {f"orch_{name}{dict(tags)}": total for (name, tags), total in sorted(self._last.items())}}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EXPORT_EVERY_S)
            try:
                self.export_once()
            except Exception:  # metrics must never disturb the pool
                pass
