"""The ``orch-metrics`` actor: totals of the ingress-side series across every replica."""

from __future__ import annotations

from typing import Any

import ray

from orch.actors import singleton
from orch.observability.ingress_metrics import merge

ACTOR_NAME = "orch-metrics"


@ray.remote(num_cpus=0)
class MetricsActor:
    def __init__(self) -> None:
        self.totals: dict[str, Any] = {}

    def add(self, deltas: dict[str, Any]) -> None:
        self.totals = merge(self.totals, deltas)

    def read(self) -> dict[str, Any]:
        return self.totals


def metrics_actor(namespace: str):
    """The totals actor, created on first use."""
    return singleton(MetricsActor, ACTOR_NAME, namespace, on_head=False, max_concurrency=100)
