"""Contract types shared by the ingress, the pools and clients (pydantic, no Ray)."""

from orch.api.errors import BackpressureBody, ErrorCode, ErrorEnvelope, HTTP_STATUS
from orch.api.events import (
    EventKind,
    FinishReason,
    SSEEnd,
    SSEError,
    SSEMetrics,
    SSEStarted,
    SSEToken,
    TERMINAL_EVENTS,
)
from orch.api.tasks import (
    AdmissionResponse,
    Engine,
    PlacementMode,
    PlacementOverrides,
    Priority,
    StreamLinks,
    TaskRequest,
)

__all__ = [
    "AdmissionResponse",
    "BackpressureBody",
    "Engine",
    "ErrorCode",
    "ErrorEnvelope",
    "EventKind",
    "FinishReason",
    "HTTP_STATUS",
    "PlacementMode",
    "PlacementOverrides",
    "Priority",
    "SSEEnd",
    "SSEError",
    "SSEMetrics",
    "SSEStarted",
    "SSEToken",
    "StreamLinks",
    "TaskRequest",
    "TERMINAL_EVENTS",
]
