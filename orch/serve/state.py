"""What the ingress's routes share: config, the pool registry, the task service, and the
handles of the orchestrator's singleton actors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from orch.config import OrchConfig
from orch.observability.ingress_metrics import IngressCounters
from orch.observability.series import LiveSeries
from orch.serve.registry import PoolRegistry
from orch.serve.service import SessionGate, TaskService


@dataclass
class IngressState:
    config: OrchConfig
    registry: PoolRegistry
    sessions: Optional[SessionGate] = None
    #: Handle of the artifact actor (None: artifacts not reachable from this process).
    artifacts: Any = None
    #: Handle of the metrics actor that totals the ingress-side series of every replica.
    metrics: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    counters: IngressCounters = field(default_factory=IngressCounters)
    #: The last minutes per pool, for the status page's charts.
    series: LiveSeries = field(default_factory=LiveSeries)
    service: TaskService = field(init=False)

    def __post_init__(self) -> None:
        self.service = TaskService(self.registry, self.sessions, self.counters, self.series)
        self.registry.listeners.append(
            lambda rows: self.series.queue_depths((pid, row.queue_depth) for pid, row in rows.items() if row.live))
