"""Where one request's first-token time goes: its marks at each hop, kept per task by the
ingress replica that served it, and the split into queue, engine and orchestrator time that
``latency_first_token_split_ms`` counts.

Marks are ``time.monotonic()`` values: the ingress's own, and the pool's (``TaskMarks``)
from the page that carried the first token. The split only subtracts durations taken on one
clock each, so it holds across hosts; the hop-by-hop table of ``bench/trace.py`` reads the
marks as one timeline, which holds on one host (Linux's monotonic clock is system-wide).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, Optional

from orch.api.pools import TaskMarks

#: When this replica's ASGI app received the current request (set by the outermost middleware).
RECEIVED_AT: ContextVar[Optional[float]] = ContextVar("orch_received_at", default=None)
#: Traces one replica keeps (the newest).
CAPACITY = 2048
#: The parts of a first-token time (the ``part`` label).
PARTS = ("orchestrator", "queue", "engine")


def received_at() -> float:
    """When the current request reached this replica (now, outside a request)."""
    value = RECEIVED_AT.get()
    return value if value is not None else time.monotonic()


@dataclass
class RequestTrace:
    task_id: str
    #: The request that admitted the task reached the ingress.
    received_at: float
    #: The route handed the parsed request to admission (body read, validated, prompt rendered).
    parsed_at: Optional[float] = None
    #: Placement decided; the submit leaves for the pool.
    placed_at: Optional[float] = None
    #: The pool's admission answered.
    admitted_at: Optional[float] = None
    #: The request that streams the events (``GET /v2/tasks/{id}/events``) reached the ingress;
    #: None when the admitting request streams itself (the OpenAI routes).
    stream_received_at: Optional[float] = None
    #: The pool's marks, from the page that carried the first token.
    pool: Optional[TaskMarks] = None
    #: That page reached the ingress.
    page_received_at: Optional[float] = None
    #: The page with the first token was handed to the route that writes it.
    relayed_at: Optional[float] = None

    def split_ms(self) -> Optional[dict[str, float]]:
        """Queue, engine and orchestrator milliseconds of the first token; None before it.

        orchestrator = (relay - receipt at the ingress) - (first token - admission in the pool).
        A stream opened after the token was ready (a client that waited before its GET)
        counts from the GET, not from the POST: the client's pause is not the orchestrator's.
        """
        pool = self.pool
        if pool is None or self.relayed_at is None or pool.first_token_at is None or pool.started_at is None:
            return None
        in_pool = pool.first_token_at - pool.admitted_at
        ingress = self.relayed_at - self.received_at
        if self.stream_received_at is not None and self.stream_received_at - self.received_at > in_pool:
            orchestrator = self.relayed_at - self.stream_received_at
        else:
            orchestrator = ingress - in_pool
        return {"orchestrator": max(0.0, orchestrator) * 1000,
                "queue": (pool.started_at - pool.admitted_at) * 1000,
                "engine": (pool.first_token_at - pool.started_at) * 1000}

    def to_dict(self) -> dict[str, Any]:
        marks = {k: v for k, v in asdict(self).items() if k not in ("task_id", "pool")}
        if self.pool is not None:
            marks.update({f"pool_{k}": v for k, v in asdict(self.pool).items()})
        return {"task_id": self.task_id, "marks": marks, "split_ms": self.split_ms()}


class Traces:
    """The newest traces of one replica, by task id (bounded)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._by_task: OrderedDict[str, RequestTrace] = OrderedDict()

    def add(self, trace: RequestTrace) -> RequestTrace:
        self._by_task[trace.task_id] = trace
        self._by_task.move_to_end(trace.task_id)
        while len(self._by_task) > self.capacity:
            self._by_task.popitem(last=False)
        return trace

    def get(self, task_id: str) -> Optional[RequestTrace]:
        return self._by_task.get(task_id)
