"""SSE payloads of ``GET /v2/tasks/{id}/events``.

A stream is ``started`` -> ``token``* (interleaved with optional ``metrics``) -> ``end`` or
``error``. Nothing follows ``end`` or ``error``. Every frame carries an ``id:`` line equal to
its index in the task's event sequence, so a client can resume with ``Last-Event-ID``.

Producers build each frame's ``data`` as one of these models and send its ``payload()``:
absent fields stay off the wire, except in ``metrics``, whose state fields are always sent
(null meaning "not known" or "no longer applies").
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional, Union

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


class EventPayload(BaseModel):
    def payload(self) -> dict[str, Any]:
        """The frame's ``data`` as JSON values, without the fields not given."""
        return self.model_dump(mode="json", exclude_none=True)


class SSEStarted(EventPayload):
    queue_position: int = Field(ge=0)
    predicted_start_ms: int = Field(ge=0)
    queue_wait_ms: Optional[int] = Field(default=None, ge=0, description="how long the task waited in the queue")
    pool_id: str
    engine: str
    engine_version: str
    seed: Optional[int] = Field(default=None, description="the sampling seed; absent for embeddings")
    prompt_tokens: int = Field(ge=0)
    placement: Optional[dict[str, Any]] = Field(default=None, description=(
        "why placement chose this pool: reason, overlap_tokens (prompt tokens it probably had cached) and "
        "alternatives (each candidate's pool_id, score_ms, overlap_tokens, expected_wait_ms), best first"))


class SSEAlternative(BaseModel):
    token: str
    logprob: float


class SSETokenLogprob(BaseModel):
    """One token's log-probability (``logprobs`` / ``prompt_logprobs`` of the request)."""

    token: str
    logprob: Optional[float] = Field(description="null for the prompt's first token, which nothing predicts")
    bytes: list[int] = Field(default_factory=list, description="the token's raw bytes")
    top: list[SSEAlternative] = Field(default_factory=list, description="the likeliest tokens here, likeliest first")


class SSEToken(EventPayload):
    """Generated text: ``t`` holds one or more tokens, ``i`` is the index of its first one."""

    t: str
    i: int = Field(ge=0)
    logprobs: Optional[list[SSETokenLogprob]] = Field(
        default=None, description="with logprobs asked: one entry per token of t")
    prompt_logprobs: Optional[list[SSETokenLogprob]] = Field(
        default=None, description="with prompt_logprobs asked: the prompt's tokens, on one event with empty t "
                                  "before any output (it counts no output token)")

    def payload(self) -> dict[str, Any]:
        """Null logprobs stay on the wire (the prompt's first token has none)."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key in ("logprobs", "prompt_logprobs"):
            if getattr(self, key) is not None:
                data[key] = [entry.model_dump(mode="json") for entry in getattr(self, key)]
        return data


#: Fields of ``metrics`` sent even when null.
METRICS_STATE_FIELDS = ("queue_depth", "queue_position", "on_time_probability", "kv_warmth", "tokens_out",
                        "tokens_per_s")


class SSEMetrics(EventPayload):
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
    budgets: Optional[dict[str, Optional[Union[int, float]]]] = Field(
        default=None, description="the session's budgets left (tokens, time_ms, cost), this task's use so far deducted")
    prep: Optional[dict] = Field(default=None, description="preparation progress while the pool loads the model")
    human: Optional[str] = Field(default=None, description="one plain sentence; only with ?verbose=true")

    def payload(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {key: value for key, value in data.items() if value is not None or key in METRICS_STATE_FIELDS}


class SSEEnd(EventPayload):
    tokens_out: int = Field(ge=0)
    decode_time_ms: int = Field(ge=0)
    finish_reason: FinishReason
    tokens_in: Optional[int] = Field(default=None, ge=0, description="embeddings: tokens read")
    embeddings: Optional[list[list[float]]] = Field(default=None, description="embeddings: one vector per input")
    transcript_id: Optional[str] = Field(default=None, description="the artifact id of the task's transcript")


class SSEError(EventPayload):
    code: ErrorCode
    message: str
    retriable: bool = False
    retry_after_ms: Optional[int] = None
    engine: Optional[str] = None
    pool_id: Optional[str] = None
    transcript_id: Optional[str] = Field(default=None, description="the artifact id of the task's transcript")
