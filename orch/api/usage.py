"""What ``GET /v2/keys/{key_id}/usage`` answers: a key's totals and where its limits stand."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from orch.api.keys import KeyLimits


class UsageTotals(BaseModel):
    """Counted since the key was first used: tasks admitted, refusals (by the limit or
    error code that refused), and the real tokens of the tasks that ended."""

    requests: int = 0
    rejections: int = 0
    rejections_by_limit: dict[str, int] = Field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0


class KeyUsage(UsageTotals):
    key_id: str
    tenant: str
    limits: KeyLimits = Field(default_factory=KeyLimits)
    #: Tasks queued or running now, and the sliding minute's admissions and tokens (tokens of
    #: running tasks count their estimate until they end).
    active_tasks: int = 0
    requests_last_minute: int = 0
    tokens_last_minute: int = 0
    budget_period: Optional[str] = Field(default=None, description="the UTC day (2026-11-30) or month (2026-11)")
    budget_used: int = 0
    tenant_usage: UsageTotals = Field(default_factory=UsageTotals, description="the key's whole tenant")
