"""Counters and histograms a pool keeps about its own work. Plain Python, no Ray.

Engine threads observe first-token latencies while the event loop counts admissions, so
each instrument takes a small lock. The whole set travels in the pool's snapshot as plain
data; the ingress turns every pool's set into one Prometheus exposition.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Any

from orch.observability.names import DECODE_BUCKETS_MS, FIRST_TOKEN_BUCKETS_MS


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: above every bucket
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self.counts[index] += 1
            self.total += value

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total}


class LabeledCounter:
    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, label: str, amount: float = 1) -> None:
        with self._lock:
            self.values[label] += amount

    def to_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self.values)


class PoolMetrics:
    """One pool's instruments, keyed by one label each (priority, reason, outcome, policy)."""

    def __init__(self) -> None:
        self.enqueued = LabeledCounter()      # priority
        self.started = LabeledCounter()       # priority
        self.canceled = LabeledCounter()      # priority
        self.rejected = LabeledCounter()      # reason (the error code)
        self.finished = LabeledCounter()      # outcome: end | error code
        self.backpressure = LabeledCounter()  # policy
        self.tokens = LabeledCounter()        # in | out
        self.first_token_ms: dict[str, Histogram] = {}
        self.decode_ms: dict[str, Histogram] = {}
        self._lock = threading.Lock()

    def _histogram(self, table: dict[str, Histogram], priority: str, buckets) -> Histogram:
        with self._lock:
            if priority not in table:
                table[priority] = Histogram(buckets)
            return table[priority]

    def first_token(self, priority: str, ms: float) -> None:
        self._histogram(self.first_token_ms, priority, FIRST_TOKEN_BUCKETS_MS).observe(ms)

    def decoded(self, priority: str, ms: float) -> None:
        self._histogram(self.decode_ms, priority, DECODE_BUCKETS_MS).observe(ms)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            first = {k: h.to_dict() for k, h in self.first_token_ms.items()}
            decode = {k: h.to_dict() for k, h in self.decode_ms.items()}
        return {
            "enqueued": self.enqueued.to_dict(),
            "started": self.started.to_dict(),
            "canceled": self.canceled.to_dict(),
            "rejected": self.rejected.to_dict(),
            "finished": self.finished.to_dict(),
            "backpressure": self.backpressure.to_dict(),
            "tokens": self.tokens.to_dict(),
            "first_token_ms": first,
            "decode_ms": decode,
        }
