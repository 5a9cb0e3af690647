"""SSE payloads of ``GET /v2/tasks/{id}/events``.

A stream is ``started`` -> ``token``* (interleaved with optional ``metrics``) -> ``end`` or
``error``. Nothing follows ``end`` or ``error``. Every frame carries an ``id:`` line equal to
its index in the task's event sequence, so a client can resume with ``Last-Event-ID``.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from orch.api.errors import ErrorCode


class EventKind(str, Enum):
    started = "started"
    token = "token"
    metrics = "metrics"
    end = "end"
    error = "error"


TERMINAL_EVENTS = frozenset({EventKind.end.value, EventKind.error.value})


class FinishReason(str, Enum):
    length = "length"
    stop = "stop"
    cancelled = "cancelled"


class SSEStarted(BaseModel):
    queue_position: int = Field(ge=0)
    predicted_start_ms: int = Field(ge=0)
    pool_id: str
    engine: str
    engine_version: str
    seed: int
    prompt_tokens: int = Field(ge=0)


class SSEToken(BaseModel):
    t: str
    i: int = Field(ge=0)


class SSEMetrics(BaseModel):
    """Where a task stands, sent when it starts, about once a second while it runs, and
    every 2 s while it waits in the queue; fields may be added compatibly."""

    model_config = ConfigDict(extra="allow")

    queue_depth: Optional[int] = Field(default=None, description="tasks waiting in the pool's queue")
    queue_position: Optional[int] = Field(default=None, description="this task's place in the queue (0 = next); "
                                          "null once it runs")
    on_time_probability: Optional[float] = Field(
        default=None, ge=0, le=1, description="chance to finish before deadline_ms at the pool's measured first-token "
        "time and decode rate (assuming all max_tokens are generated); null without a deadline or before the pool "
        "has measured a task")
    kv_warmth: Optional[bool] = Field(default=None, description="the task's session ran its last turn on this pool")
    tokens_out: Optional[int] = Field(default=None, ge=0)
    tokens_per_s: Optional[float] = Field(default=None, description="the pool's measured decode rate")
    budgets: Optional[dict[str, Optional[float]]] = Field(
        default=None, description="the session's budgets left (tokens, time_ms, cost), this task's use so far deducted")
    prep: Optional[dict] = Field(default=None, description="preparation progress while the pool loads the model")
    human: Optional[str] = Field(default=None, description="one plain sentence; only with ?verbose=true")


class SSEEnd(BaseModel):
    tokens_out: int = Field(ge=0)
    decode_time_ms: int = Field(ge=0)
    finish_reason: FinishReason


class SSEError(BaseModel):
    code: ErrorCode
    message: str
    retriable: bool = False
    retry_after_ms: Optional[int] = None
    engine: Optional[str] = None
    pool_id: Optional[str] = None
