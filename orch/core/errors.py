"""The one exception type the core raises; the ingress turns it into an error envelope."""

from __future__ import annotations

from typing import Any, Optional

from orch.api.errors import HTTP_STATUS, ErrorCode


class OrchError(Exception):
    """A refusal with a stable code and a message that says what to fix."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retriable: bool = False,
        retry_after_ms: Optional[int] = None,
        pool_id: Optional[str] = None,
        engine: Optional[str] = None,
        policy_label: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retriable = retriable
        self.retry_after_ms = retry_after_ms
        self.pool_id = pool_id
        self.engine = engine
        self.policy_label = policy_label

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_dict(self) -> dict[str, Any]:
        """Envelope fields, without the empty ones."""
        body: dict[str, Any] = {"code": self.code.value, "message": self.message}
        for key in ("engine", "pool_id", "retriable", "retry_after_ms", "policy_label"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "OrchError":
        return cls(
            ErrorCode(body["code"]),
            body.get("message", ""),
            retriable=bool(body.get("retriable", False)),
            retry_after_ms=body.get("retry_after_ms"),
            pool_id=body.get("pool_id"),
            engine=body.get("engine"),
            policy_label=body.get("policy_label"),
        )

    def __reduce__(self):  # keeps the fields when pickled across processes
        return (OrchError.from_dict, (self.to_dict(),))
