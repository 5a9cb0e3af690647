"""Error contract: stable codes, the error envelope and the backpressure body.

Clients branch on ``code``; the message is for people and may change.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from orch.api.preparation import Preparation


class ErrorCode(str, Enum):
    ADMISSION_REJECT = "ADMISSION_REJECT"
    QUEUE_FULL_DROP_LRU = "QUEUE_FULL_DROP_LRU"
    INVALID_PARAMS = "INVALID_PARAMS"
    POOL_UNREADY = "POOL_UNREADY"
    POOL_UNAVAILABLE = "POOL_UNAVAILABLE"
    REPLICA_EXHAUSTED = "REPLICA_EXHAUSTED"
    DECODE_TIMEOUT = "DECODE_TIMEOUT"
    WORKER_RESET = "WORKER_RESET"
    INTERNAL = "INTERNAL"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    RATE_LIMITED = "RATE_LIMITED"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    PRIORITY_NOT_ALLOWED = "PRIORITY_NOT_ALLOWED"


#: HTTP status used for each code when it answers a request (SSE errors carry no status).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.ADMISSION_REJECT: 429,
    ErrorCode.QUEUE_FULL_DROP_LRU: 429,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.POOL_UNREADY: 503,
    ErrorCode.POOL_UNAVAILABLE: 503,
    ErrorCode.REPLICA_EXHAUSTED: 503,
    ErrorCode.DECODE_TIMEOUT: 504,
    ErrorCode.WORKER_RESET: 503,
    ErrorCode.INTERNAL: 500,
    ErrorCode.BUDGET_EXCEEDED: 429,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.MODEL_NOT_ALLOWED: 403,
    ErrorCode.PRIORITY_NOT_ALLOWED: 403,
}


class ErrorEnvelope(BaseModel):
    """Body of every non-2xx answer of the v2 API."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    code: ErrorCode
    message: str
    engine: Optional[str] = None
    pool_id: Optional[str] = None
    retriable: Optional[bool] = None
    retry_after_ms: Optional[int] = Field(default=None, ge=0)
    policy_label: Optional[str] = None
    correlation_id: Optional[str] = None
    preparation: Optional[Preparation] = Field(
        default=None, description="POOL_UNREADY for a model that is not present: what would make it present")


class BackpressureBody(ErrorEnvelope):
    """429 body: the envelope with the backpressure fields made mandatory."""

    policy_label: str
    retriable: bool
    retry_after_ms: int = Field(ge=0)


def field_path(loc: tuple) -> str:
    """A validation error's location as a field path people read (``pools[0].queue.capacity``);
    empty for the top level."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
