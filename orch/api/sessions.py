"""Sessions contract: what ``GET /v2/sessions/{id}`` shows. Metadata only: a session never
holds prompts, messages or outputs."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class SessionBudgets(BaseModel):
    """What is left of each budget; null for a budget that is not configured."""

    tokens: Optional[int] = Field(default=None, ge=0, description="tokens_in + tokens_out left")
    time_ms: Optional[int] = Field(default=None, ge=0, description="decode time left, in milliseconds")
    cost: Optional[float] = Field(default=None, ge=0, description="spend left, in the configured price unit")


class SessionInfo(BaseModel):
    """A session's turns, budgets and placement."""

    session_id: str
    ttl_ms_remaining: int = Field(ge=0, description="until the session expires, counted from its last activity")
    turns: int = Field(ge=0, description="tasks admitted in this session")
    max_turns: int = Field(ge=1)
    kv_bytes: int = Field(
        ge=0, description="KV cache kept for the session; 0 today, since pools reset their context every turn")
    kv_warmth: bool = Field(description="the last turn ran on the same pool as the turn before it")
    last_pool_id: Optional[str] = None
    budgets: Optional[SessionBudgets] = Field(default=None, description="null when no budget is configured")
