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
    """Pool snapshot during a task; fields may be added compatibly."""

    model_config = ConfigDict(extra="allow")

    queue_depth: Optional[int] = None
    on_time_probability: Optional[float] = None
    kv_warmth: Optional[bool] = None


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
