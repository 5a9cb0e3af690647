"""Series the ingress itself produces (placement decisions, catalog verifications), shared
by every replica.

Each replica counts locally and flushes its deltas to the ``orch-metrics`` actor about once
a second, off the request path; ``/metrics`` on any replica therefore reports the same
totals, at most one flush interval old.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Optional

from orch.core.placement import PlacementDecision
from orch.observability.names import CANDIDATE_BUCKETS
from orch.observability.pool_metrics import Histogram


class IngressCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str, str], int] = defaultdict(int)
        self._candidates = Histogram(CANDIDATE_BUCKETS)
        self._verifications: dict[str, int] = defaultdict(int)

    def placed(self, decision: PlacementDecision) -> None:
        key = ("placed", str(decision.pinned).lower(), str(decision.fallback).lower())
        with self._lock:
            self._decisions[key] += 1
        self._candidates.observe(decision.candidates_considered)

    def refused(self, code: str, pinned: bool) -> None:
        with self._lock:
            self._decisions[(f"refused_{code.lower()}", str(pinned).lower(), "false")] += 1

    def verified(self, result: str) -> None:
        """One digest verification of a catalogued model: ``ok``, ``mismatch`` or ``missing``."""
        with self._lock:
            self._verifications[result] += 1

    def take_deltas(self) -> Optional[dict[str, Any]]:
        """What was counted since the last call, or None when nothing was."""
        with self._lock:
            decisions, self._decisions = dict(self._decisions), defaultdict(int)
            verifications, self._verifications = dict(self._verifications), defaultdict(int)
        candidates = self._candidates.to_dict()
        self._candidates = Histogram(CANDIDATE_BUCKETS)
        if not decisions and not verifications and not sum(candidates["counts"]):
            return None
        return {"decisions": [[list(k), v] for k, v in decisions.items()], "candidates": candidates,
                "verifications": verifications}


def merge(totals: dict[str, Any], deltas: dict[str, Any]) -> dict[str, Any]:
    """Add one replica's deltas into the shared totals (plain data, both sides)."""
    decisions = {tuple(k): v for k, v in totals.get("decisions", [])}
    for key, value in deltas.get("decisions", []):
        decisions[tuple(key)] = decisions.get(tuple(key), 0) + value
    candidates = totals.get("candidates")
    extra = deltas.get("candidates")
    if candidates is None:
        candidates = extra
    elif extra is not None:
        candidates = {
            "buckets": candidates["buckets"],
            "counts": [a + b for a, b in zip(candidates["counts"], extra["counts"])],
            "sum": candidates["sum"] + extra["sum"],
        }
    verifications = dict(totals.get("verifications", {}))
    for result, value in deltas.get("verifications", {}).items():
        verifications[result] = verifications.get(result, 0) + value
    return {"decisions": [[list(k), v] for k, v in decisions.items()], "candidates": candidates,
            "verifications": verifications}
