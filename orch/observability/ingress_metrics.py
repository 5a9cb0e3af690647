"""Series the ingress itself produces (placement decisions, catalog verifications, the
split of first-token time into orchestrator, queue and engine), shared by every replica.

Each replica counts locally and flushes its deltas to the ``orch-metrics`` actor about once
a second, off the request path; ``/metrics`` on any replica therefore reports the same
totals, at most one flush interval old.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Optional

from orch.core.placement import PlacementDecision
from orch.observability.names import CANDIDATE_BUCKETS, SPLIT_BUCKETS_MS
from orch.observability.pool_metrics import Histogram


class IngressCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._candidates = Histogram(CANDIDATE_BUCKETS)
        self._verifications: dict[str, int] = defaultdict(int)
        self._split = _split_histograms()

    def placed(self, decision: PlacementDecision) -> None:
        key = ("placed", str(decision.pinned).lower(), str(decision.fallback).lower(), decision.reason)
        with self._lock:
            self._decisions[key] += 1
        self._candidates.observe(decision.candidates_considered)

    def refused(self, code: str, pinned: bool) -> None:
        with self._lock:
            self._decisions[(f"refused_{code.lower()}", str(pinned).lower(), "false", "refused")] += 1

    def verified(self, result: str) -> None:
        """One digest verification of a catalogued model: ``ok``, ``mismatch`` or ``missing``."""
        with self._lock:
            self._verifications[result] += 1

    def first_token_split(self, parts: dict[str, float]) -> None:
        """One request's first-token time in parts (milliseconds; orch/observability/trace.py)."""
        split = self._split
        for part, ms in parts.items():
            split[part].observe(ms)

    def take_deltas(self) -> Optional[dict[str, Any]]:
        """What was counted since the last call, or None when nothing was."""
        with self._lock:
            decisions, self._decisions = dict(self._decisions), defaultdict(int)
            verifications, self._verifications = dict(self._verifications), defaultdict(int)
            split, self._split = self._split, _split_histograms()
        candidates = self._candidates.to_dict()
        self._candidates = Histogram(CANDIDATE_BUCKETS)
        split_data = {part: h.to_dict() for part, h in split.items() if sum(h.counts)}
        if not decisions and not verifications and not sum(candidates["counts"]) and not split_data:
            return None
        return {"decisions": [[list(k), v] for k, v in decisions.items()], "candidates": candidates,
                "verifications": verifications, "split": split_data}


def _split_histograms() -> dict[str, Histogram]:
    return {part: Histogram(SPLIT_BUCKETS_MS) for part in ("orchestrator", "queue", "engine")}


def _add_histograms(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if a is None or b is None:
        return a if b is None else b
    return {"buckets": a["buckets"], "counts": [x + y for x, y in zip(a["counts"], b["counts"])],
            "sum": a["sum"] + b["sum"]}


def merge(totals: dict[str, Any], deltas: dict[str, Any]) -> dict[str, Any]:
    """Add one replica's deltas into the shared totals (plain data, both sides)."""
    decisions = {tuple(k): v for k, v in totals.get("decisions", [])}
    for key, value in deltas.get("decisions", []):
        decisions[tuple(key)] = decisions.get(tuple(key), 0) + value
    candidates = _add_histograms(totals.get("candidates"), deltas.get("candidates"))
    split = dict(totals.get("split", {}))
    for part, data in deltas.get("split", {}).items():
        split[part] = _add_histograms(split.get(part), data)
    verifications = dict(totals.get("verifications", {}))
    for result, value in deltas.get("verifications", {}).items():
        verifications[result] = verifications.get(result, 0) + value
    return {"decisions": [[list(k), v] for k, v in decisions.items()], "candidates": candidates,
            "verifications": verifications, "split": split}
